"""``ecglm demo``'s page: the Gradio Blocks in front of a :class:`~ecglm.serving.demo.DemoModel`.

Gradio (the ``demo`` extra) gives the upload box, the printout gallery, the answers table and the
queue (one ask at a time); everything the page does goes through the ``DemoModel``. A refused input
(:class:`~ecglm.serving.requests.RequestError`) is shown as the page's error, naming the problem.
"""

from __future__ import annotations

from typing import Any

from ecglm.serving.demo import NOT_A_MEDICAL_DEVICE, DemoModel, describe
from ecglm.serving.requests import RequestError

#: Element ids the browser test and the screenshot script find the page's parts by.
IDS = {
    "upload": "ecg-upload",
    "example": "use-example",
    "presets": "preset-questions",
    "questions": "free-questions",
    "ask": "ask",
    "printouts": "printouts",
    "answers": "answers",
    "source": "source",
    "card": "model-card",
}
ANSWER_HEADERS = ["window", "seconds", "question", "answer"]


def build_page(model: DemoModel, title: str | None = None) -> Any:
    """The page of ``model``, a ``gradio.Blocks`` (launch it with its ``queue()`` on)."""
    import gradio as gr

    title = title or f"ecglm demo: {model.bundle.resolve().name}"

    def refused(err: Exception) -> Exception:
        return gr.Error(str(err), title="Cannot answer")

    def read(files: list[str] | None, use_example: bool, fs: Any, leads: str) -> Any:
        if use_example and not files:
            return model.example_recording()
        # An empty number box gives 0 (Gradio's Number), which means "not given" here.
        return model.read_files(files or [], fs or None, leads)

    def show(files: list[str] | None, use_example: bool, fs: Any, leads: str, window: str):
        if not files and not use_example:
            return [], ""
        try:
            ecg = read(files, use_example, fs, leads)
            job = None if isinstance(ecg, bytes) else model.job(ecg, ["?"], window, _name(ecg))
            return model.printouts(ecg, job), describe(job) if job is not None else "a picture"
        except RequestError as err:
            raise refused(err) from None

    def ask(files, use_example, fs, leads, window, presets, free):
        questions = [*(presets or []), *(line for line in (free or "").splitlines() if line.strip())]
        try:
            answered = model.ask(read(files, use_example, fs, leads), questions, window)
        except RequestError as err:
            raise refused(err) from None
        return answered.printouts, answered.rows, answered.source

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"# {title}\n\n{NOT_A_MEDICAL_DEVICE}")
        use_example = gr.State(False)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="ECG file: WFDB (.hea with its .dat, or a .zip of them), .edf, .csv, .npy"
                    + (
                        ", or a photo / scan of a printout (PNG, JPEG)"
                        if ".png" in model.upload_formats()
                        else ""
                    ),
                    file_count="multiple",
                    file_types=model.upload_formats(),
                    type="filepath",
                    elem_id=IDS["upload"],
                )
                example = gr.Button(
                    "Use the example ECG", elem_id=IDS["example"], interactive=model.example is not None
                )
                with gr.Row():
                    fs = gr.Number(label="sampling rate, Hz (.csv / .npy; 0: not given)", value=0, minimum=0)
                    leads = gr.Textbox(
                        label="lead names (.npy; .csv without a header)", placeholder="I,II,..."
                    )
                window = gr.Radio(
                    ["first", "all"],
                    value="first",
                    label="windows: the first 10 s, or every window of the record",
                )
                presets = gr.Dropdown(
                    model.questions,
                    value=model.questions[:1],
                    multiselect=True,
                    label="preset questions",
                    elem_id=IDS["presets"],
                )
                free = gr.Textbox(label="your questions (one a line)", lines=3, elem_id=IDS["questions"])
                button = gr.Button("Ask", variant="primary", elem_id=IDS["ask"])
            with gr.Column(scale=2):
                source = gr.Markdown(elem_id=IDS["source"])
                answers = gr.Dataframe(
                    headers=ANSWER_HEADERS,
                    label="answers, window by window",
                    interactive=False,
                    wrap=True,
                    elem_id=IDS["answers"],
                )
                printouts = gr.Gallery(
                    label="the 12-lead printout, window by window",
                    columns=1,
                    height="auto",
                    object_fit="contain",
                    allow_preview=False,
                    elem_id=IDS["printouts"],
                )
        with gr.Accordion("Model card", open=True):
            gr.Markdown(model.card_markdown(), elem_id=IDS["card"])

        inputs = [upload, use_example, fs, leads, window]
        # .upload, not .change: taking the example clears the box, which must not undo itself.
        upload.upload(lambda: False, None, use_example).then(show, inputs, [printouts, source])
        example.click(lambda: (None, True), None, [upload, use_example]).then(
            show, inputs, [printouts, source]
        )
        button.click(ask, [*inputs, presets, free], [printouts, answers, source])
    return page


def _name(ecg: Any) -> str:
    return getattr(ecg, "source", "the picture")
