"""Bad input gives one-line ConfigErrors (exit 2) and leaves nothing behind; quirks; the CLI."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from harness.errors import ConfigError
from synthetic_data import GeneratorOptions, write_archive
from synthetic_data import writer as writer_mod
from synthetic_data.cli import generate_command
from synthetic_data.manifest import read_manifest
from synthetic_data.quirks import QUIRKS


@pytest.mark.parametrize("kwargs,option", [
    ({"modalities": ["CT", "PET"]}, "modalities"),
    ({"transfer_syntaxes": "zip"}, "transfer_syntaxes"),
    ({"charsets": ["ISO_IR 999"]}, "charsets"),
    ({"scale": "huge"}, "scale"),
    ({"patients": 0}, "patients"),
    ({"facilities": -1}, "facilities"),
    ({"trap_rate": 1.5}, "trap_rate"),
    ({"uid_root": "1.02.3"}, "uid_root"),
    ({"seed": -1}, "seed"),
])
def test_bad_options(kwargs, option):
    with pytest.raises(ConfigError) as info:
        GeneratorOptions(**kwargs)
    message = str(info.value)
    assert message.startswith(option) and "\n" not in message


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_non_empty_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_archive(GeneratorOptions(), out)
    assert _leftovers(out) == ["keep.txt"] and _leftovers(tmp_path) == ["out"]


def test_empty_output_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    assert write_archive(GeneratorOptions(patients=1), tmp_path / "out")["instances"] > 0


def test_scale_larger_than_free_disk_is_refused(tmp_path, monkeypatch):
    class Usage:
        free = 10 * 1024 * 1024

    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: Usage())
    opts = GeneratorOptions(patients=2, modalities=["CT"], scale="realistic")
    with pytest.raises(ConfigError, match="^scale: realistic .* GB"):
        write_archive(opts, tmp_path / "big")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, exc):
    real = writer_mod.encode_instance
    calls = []

    def flaky(inst, encoder):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(inst, encoder)

    monkeypatch.setattr(writer_mod, "encode_instance", flaky)
    with pytest.raises(type(exc)):
        write_archive(GeneratorOptions(patients=3), tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_failure_in_writer_thread_leaves_nothing(tmp_path, monkeypatch):
    real = writer_mod._FileSink._write
    calls = []

    def full_disk(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(writer_mod._FileSink, "_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_archive(GeneratorOptions(patients=4), tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_quirks_are_labelled_and_present(tmp_path):
    opts = GeneratorOptions(patients=12, modalities="CT,CR,SR,DOC,US", seed=0, quirks=True,
                            transfer_syntaxes="explicit,implicit", facilities=2)
    counts = write_archive(opts, tmp_path / "q")
    records = read_manifest(tmp_path / "q")
    assert set(counts["by_quirk"]) == set(QUIRKS)
    assert 0 < counts["quirky_instances"] < len(records)
    for rec in records:
        raw = (tmp_path / "q" / rec["path"]).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(tmp_path / "q" / rec["path"])
        q = rec["quirks"]
        assert ("AccessionNumber" not in ds) == ("missing_type2" in q)
        assert ("/" in str(ds.StudyDate)) == ("nonstandard_date" in q)
        assert ("RecognitionCode" in ds) == ("retired_attributes" in q)
        if "trailing_spaces" in q:
            assert (rec["patient"]["patient_id"] + "   ").encode() in raw
        if "odd_length" in q:
            pos = raw.index(b"\x08\x00\x30\x10", 132)
            implicit = rec["transfer_syntax_name"] == "implicit"
            length = (struct.unpack("<I", raw[pos + 4:pos + 8])[0] if implicit
                      else struct.unpack("<H", raw[pos + 6:pos + 8])[0])
            assert length % 2 == 1
            assert str(ds.StudyDescription) == rec["study"]["description"] or \
                str(ds.StudyDescription).endswith(".")


def test_no_quirks_by_default():
    from synthetic_data.generator import iter_instances

    assert all(not i.record["quirks"] for i in iter_instances(GeneratorOptions(patients=4)))


def test_cli_writes_archive(tmp_path):
    result = CliRunner().invoke(generate_command, [
        "--out", str(tmp_path / "cli"), "--patients", "2", "--modalities", "CT,SR",
        "--facilities", "2", "--seed", "1", "--charsets", "latin1,korean",
        "--transfer-syntaxes", "explicit,rle", "--trap-rate", "0.5"])
    assert result.exit_code == 0, result.output
    assert "instances" in result.stdout
    assert (tmp_path / "cli" / "manifest.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--modalities", "CT,XX"], "modalities"),
    (["--transfer-syntaxes", "j2k-ultra"], "transfer_syntaxes"),
    (["--charsets", "klingon"], "charsets"),
    (["--scale", "enormous"], "scale"),
])
def test_cli_bad_input_exits_2(tmp_path, args, needle):
    result = CliRunner().invoke(generate_command, ["--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {needle}")
    assert not (tmp_path / "x").exists()


def test_cli_non_empty_out_exits_2(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    result = CliRunner().invoke(generate_command, ["--out", str(tmp_path / "full")])
    assert result.exit_code == 2 and "error: out:" in result.stderr


def test_cli_help():
    result = CliRunner().invoke(generate_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--out", "--patients", "--studies-per-patient", "--modalities",
                   "--facilities", "--seed", "--scale", "--quirks", "--charsets",
                   "--transfer-syntaxes", "--uid-root", "--trap-rate"):
        assert option in result.output
