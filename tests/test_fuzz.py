"""Property-based fuzzing (hypothesis) of the safetensors header parser and of the CLI's options."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from unittest import mock

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdgen.checkpoints.files import SAFETENSORS_DTYPE_SIZES, parse_safetensors_header, read_state_dict
from sdgen.cli import cli
from sdgen.errors import CheckpointError, SdgenError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=10**7))
def test_header_parser_only_raises_value_error_on_garbage(head, size):
    try:
        parse_safetensors_header(head, size)
    except ValueError:
        pass


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*SAFETENSORS_DTYPE_SIZES, "F99", 3, None]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3), st.none()),
        "data_offsets": st.one_of(st.lists(st.integers(-8, 300), min_size=0, max_size=3), st.none()),
    }
)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), entries, max_size=4), st.integers(0, 300))
def test_header_parser_accepts_only_consistent_headers(tensors, data_size):
    head = json.dumps(tensors).encode()
    blob = struct.pack("<Q", len(head)) + head
    try:
        parsed = parse_safetensors_header(blob, len(blob) + data_size)
    except ValueError:
        return
    spans = []
    for info in parsed.values():
        begin, end = info["data_offsets"]
        n = 1
        for d in info["shape"]:
            n *= d
        assert 0 <= begin <= end <= data_size
        assert end - begin == n * SAFETENSORS_DTYPE_SIZES[info["dtype"]]
        spans.append((begin, end))
    spans.sort()
    assert all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False))


@FUZZ
@given(st.binary(max_size=400))
def test_reading_random_files_fails_only_with_checkpoint_error(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        read_state_dict(path)
    except CheckpointError:
        pass


values = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "abc", "nan", "-0", "1e400", "0x10", " 7 ", "512", "64", "8"]),
)
options = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "-H",
                "-W",
                "--steps",
                "--seed",
                "--scale",
                "--n_samples",
                "--n_iter",
                "--ddim_eta",
                "--sampler",
                "--device",
                "--precision",
                "--seed-mode",
            ]
        ),
        values,
    ),
    max_size=5,
)


@FUZZ
@given(options)
def test_cli_options_never_traceback_never_exit_0_on_bad_input(tmp_path, opts):
    """Model loading is replaced by a stop sign: every run ends at validation (usage error 2, or one-line
    error 1) or at the stop sign (1): never a traceback, never exit 0."""
    args = ["txt2img", "a cat", "--ckpt", str(tmp_path / "model.safetensors")]
    for flag, value in opts:
        args += [flag, value]
    with mock.patch("sdgen.checkpoints.load.load_model", side_effect=SdgenError("stopped before loading weights")):
        result = CliRunner().invoke(cli, args)
    assert result.exit_code in (1, 2), (args, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1
    assert not Path("outputs").exists()
