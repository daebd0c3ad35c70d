"""Helpers for tokenizer tests: GGUF files with their tokenizer keys replaced (vocab-only for llama.cpp)."""

import itertools

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from flashmoe_stream.gguf_file import open_gguf


def _copy_kv(w, fields, skip):
    for key, f in fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip or not f.types:
            continue
        t = f.types
        if t[0] == GGUFValueType.ARRAY:
            if t[1] == GGUFValueType.STRING:
                val = f.contents()
            else:
                val = [x for i in f.data for x in np.asarray(f.parts[i]).reshape(-1).tolist()]
            w.add_key_value(key, val, GGUFValueType.ARRAY, sub_type=t[1])
        else:
            w.add_key_value(key, f.contents(), t[0])


@pytest.fixture(scope="session")
def vocab_gguf(make_model, tmp_path_factory):
    """vocab_gguf(arch, {key: (value, type[, sub_type]) or None}) -> path of a tensor-less copy of the
    synthetic model's metadata with those keys replaced (None drops one), loadable with vocab_only."""
    root = tmp_path_factory.mktemp("vocab")
    counter = itertools.count()

    def make(arch, replace):
        src = open_gguf(make_model(arch, "Q8_0"))
        path = root / f"vocab{next(counter)}.gguf"
        w = GGUFWriter(str(path), arch)
        _copy_kv(w, src.fields, set(replace))
        for key, spec in replace.items():
            if spec is not None:
                w.add_key_value(key, *spec)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    return make
