"""A new output format is one module: registered here in the test alone, it exports, its extra file is ours to
remove on --overwrite and never carried from a source, and `verify` asks it to check its own part of the folder."""
from __future__ import annotations

import json
import os

import pytest

from helpers import model_dir

TOY_FILE = "toy_format.json"


@pytest.fixture
def toy_output_format():
    """An output format that writes the source weights unchanged plus one extra file, and checks that file."""
    from dist_export import output_formats
    from dist_export.output_formats import OutputFormat, register_output_format

    class ToyFormat(OutputFormat):
        name = "toy-test-format"
        file_names = (TOY_FILE,)

        def produce(self, item, w, amax, block_amax, input_amax):
            return [(item.name, w)]

        def extra_files(self, plan, recipe, calib):
            return {TOY_FILE: json.dumps({"tensors": len(plan.items)}).encode()}

        def check_folder(self, out_dir, metas, config, rep):
            path = os.path.join(out_dir, TOY_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    if json.load(f).get("tensors") != len(metas):
                        rep.defect(f"{TOY_FILE}: tensor count differs from the shards")

    fmt = register_output_format(ToyFormat())
    try:
        yield fmt
    finally:
        output_formats._OUTPUT_FORMATS.pop(fmt.name, None)


def test_registered_output_format_exports_verifies_and_owns_its_file(toy_output_format, tmp_path):
    from dist_export import export
    from dist_export.verify import verify_export

    src = model_dir("synthetic:llama-tiny")
    out = str(tmp_path / "toy")
    export(src, out, format=toy_output_format.name, verify=False)
    assert os.path.isfile(os.path.join(out, TOY_FILE))
    assert verify_export(out)["ok"]

    # verify asked the format: a wrong count in its file is reported.
    with open(os.path.join(out, TOY_FILE), "rb") as f:
        written = f.read()
    with open(os.path.join(out, TOY_FILE), "w") as f:
        json.dump({"tensors": -1}, f)
    report = verify_export(out)
    assert any(TOY_FILE in d for d in report["defects"]), report
    with open(os.path.join(out, TOY_FILE), "wb") as f:  # restored: the bytes our record names, ours again
        f.write(written)

    # The export folder used as a source: the toy file is not carried into the next export.
    again = str(tmp_path / "again")
    export(out, again, format="vllm-fq", verify=False)
    assert not os.path.exists(os.path.join(again, TOY_FILE))

    # --overwrite with another format removes the toy file (its record names it), and keeps a file of the
    # user's (refused unless allowed explicitly).
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        export(src, out, format="vllm-fq", overwrite=True, verify=False)
    export(src, out, format="vllm-fq", overwrite=True, allow_foreign_files=True, verify=False)
    assert not os.path.exists(os.path.join(out, TOY_FILE))
    assert os.path.isfile(os.path.join(out, "notes.txt"))


def test_format_writing_an_unlisted_file_is_refused_before_publishing(toy_output_format, tmp_path, monkeypatch):
    from dist_export import export
    from dist_export.layout import INDEX_NAME, SINGLE_NAME

    monkeypatch.setattr(type(toy_output_format), "file_names", ())
    out = str(tmp_path / "toy")
    with pytest.raises(RuntimeError, match="file_names do not list"):
        export(model_dir("synthetic:llama-tiny"), out, format=toy_output_format.name, verify=False)
    assert not os.path.exists(os.path.join(out, INDEX_NAME)) and not os.path.exists(os.path.join(out, SINGLE_NAME))
    assert not os.path.exists(os.path.join(out, TOY_FILE))
