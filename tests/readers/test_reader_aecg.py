"""The HL7 aECG reader against documents built per the AnnotatedECG schema (origin, scale, increment),
and the XML attacks it must refuse rather than expand."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ecg_exports import LEADS, aecg_xml, ecg_signal
from ecglm.encoders import Preprocessing
from ecglm.readers import AECGReader
from ecglm.records import RecordError, prepare, read_recording, record_format

pytest.importorskip("defusedxml")


def test_the_rhythm_series_reads_as_origin_plus_scale_times_digits_in_millivolts(tmp_path):
    digits = np.round(ecg_signal(10, 500) * 1000 / 5).astype(int)  # 5 uV per digit
    path = tmp_path / "ecg.xml"
    path.write_text(aecg_xml(digits, LEADS, increment_s=0.002, origin_uv=-20, scale_uv=5))
    recording = read_recording(path)
    assert record_format(path) == "aecg" and recording.leads == LEADS and recording.fs == pytest.approx(500)
    np.testing.assert_allclose(recording.signal, (-20 + 5 * digits) / 1000, rtol=0, atol=1e-12)
    assert recording.metadata == {"series": "RHYTHM", "derived_leads": []}
    assert prepare(recording, Preprocessing()).shape == (1, 12, 2500)


def test_an_xml_file_that_is_no_aecg_is_not_claimed(tmp_path):
    (tmp_path / "config.xml").write_text("<config><a>1</a></config>")
    assert not AECGReader().claims(tmp_path / "config.xml")
    with pytest.raises(RecordError, match=r"config\.xml: unknown ECG format"):
        read_recording(tmp_path / "config.xml")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE AnnotatedECG [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<AnnotatedECG xmlns="urn:hl7-org:v3"><id root="&lol9;"/></AnnotatedECG>
"""


def test_a_billion_laughs_file_is_refused_not_expanded(tmp_path):
    path = tmp_path / "laughs.xml"
    path.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    with pytest.raises(RecordError, match=r"laughs\.xml: refused: the XML declares entities"):
        read_recording(path)
    assert time.perf_counter() - start < 1.0  # 10**9 "lol"s were never built


def test_an_external_entity_file_is_refused_and_the_file_it_names_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("PATIENT-SECRET-4711")
    path = tmp_path / "xxe.xml"
    path.write_text(
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE AnnotatedECG [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
        '<AnnotatedECG xmlns="urn:hl7-org:v3"><id root="&xxe;"/></AnnotatedECG>\n'
    )
    with pytest.raises(RecordError, match=r"xxe\.xml: refused") as caught:
        read_recording(path)
    assert "PATIENT-SECRET" not in str(caught.value)


def test_a_document_without_a_rhythm_series_or_increment_says_so(tmp_path):
    digits = np.zeros((100, 12), dtype=int)
    text = aecg_xml(digits, LEADS, increment_s=0.002, origin_uv=0, scale_uv=5)
    (tmp_path / "beats.xml").write_text(text.replace('code="RHYTHM"', 'code="REPRESENTATIVE_BEAT"'))
    with pytest.raises(RecordError, match=r"beats\.xml: no RHYTHM series"):
        read_recording(tmp_path / "beats.xml")
    (tmp_path / "cut.xml").write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match=r"cut\.xml: not well-formed XML"):
        read_recording(tmp_path / "cut.xml")
