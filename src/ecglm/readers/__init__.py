"""ECG file readers, the ``ecglm.readers`` entry-point group: what :mod:`ecglm.records` reads files with.

A third-party reader derives from :class:`ECGReader` and registers under ``ecglm.readers`` in its
``pyproject.toml`` (docs/plugins.md, docs/records.md).
"""

from ecglm.readers.aecg import AECGReader
from ecglm.readers.base import ECGReader, file_head, split_address
from ecglm.readers.builtin import CSVReader, EDFReader, NumpyReader, WFDBReader
from ecglm.readers.dicom import DICOMReader
from ecglm.readers.hdf5 import HDF5Reader, trim_zero_padding
from ecglm.readers.leads import complete_limb_leads, standard_lead

__all__ = [
    "AECGReader",
    "CSVReader",
    "DICOMReader",
    "ECGReader",
    "EDFReader",
    "HDF5Reader",
    "NumpyReader",
    "WFDBReader",
    "complete_limb_leads",
    "file_head",
    "split_address",
    "standard_lead",
    "trim_zero_padding",
]
