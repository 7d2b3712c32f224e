"""safetensors files are recognised whatever the low byte of their header length.

That byte is the first byte of the file; 0x80, '(', '}', ']' and 'c' also start pickles,
and once sent such files to the legacy torch reader ("not a torch checkpoint").
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from wconv.convert.load import sniff
from wconv.formats import safetensors_io


@pytest.mark.parametrize("first_byte", [0x80, ord("("), ord("}"), ord("]"), ord("c"), ord("{")])
def test_header_length_that_looks_like_a_pickle_opcode(tmp_path, first_byte):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((first_byte - len(header)) % 256)  # JSON may end in spaces
    assert len(header) & 0xFF == first_byte
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array([1.5, -2], "<f4").tobytes())
    assert sniff(str(path)) == "safetensors"
    tensors, _ = safetensors_io.read(path)
    np.testing.assert_array_equal(tensors["a"].raw(), [1.5, -2])


def test_truncated_safetensors_still_goes_to_the_safetensors_reader(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) + 1000) + header)
    assert sniff(str(path)) == "safetensors"
