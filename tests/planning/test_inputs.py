"""Resolve: finding shards and reading only headers, and the errors for inputs we will not read."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from raymerge.errors import ResolveError
from raymerge.planning.inputs import resolve


def _save(path, **tensors):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v for k, v in tensors.items()}, path)


def test_finds_shards_from_index_and_lists_aux_files(tmp_path):
    _save(str(tmp_path / "m" / "a.safetensors"), w=torch.zeros(4))
    _save(str(tmp_path / "m" / "b.safetensors"), v=torch.zeros(2, dtype=torch.bfloat16))
    _save(str(tmp_path / "m" / "stray.safetensors"), z=torch.zeros(1))  # not in the index: ignored
    json.dump({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}},
              open(tmp_path / "m" / "model.safetensors.index.json", "w"))
    (tmp_path / "m" / "config.json").write_text("{}")
    ck = resolve("cp", str(tmp_path / "m"))
    assert list(ck.tensors) == ["w", "v"]
    assert [os.path.basename(f.url) for f in ck.files] == ["a.safetensors", "b.safetensors"]
    assert [os.path.basename(u) for u in ck.aux_files] == ["config.json"]
    w = ck.tensors["w"]
    raw = open(ck.files[w.file].url, "rb").read()
    assert raw[w.start:w.start + w.nbytes] == torch.zeros(4).numpy().tobytes()


def test_a_hugging_face_cache_snapshot_of_links_resolves(tmp_path):
    """The Hub's cache: every file of a snapshot is a symbolic link to a blob (fsspec lists links as
    type "other", as it does FIFOs): links to regular files are files, links to devices are not."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    _save(str(blobs / "w"), w=torch.zeros(4))
    (blobs / "c").write_text('{"vocab_size": 4}')
    (blobs / "t").write_text('{"eos_token": "</s>"}')
    os.makedirs(snap)
    for name, blob in (("model.safetensors", "w"), ("config.json", "c"), ("tokenizer_config.json", "t")):
        os.symlink(os.path.relpath(blobs / blob, snap), snap / name)
    ck = resolve("cp", str(snap))
    assert list(ck.tensors) == ["w"] and ck.config == {"vocab_size": 4}
    assert sorted(os.path.basename(u) for u in ck.aux_files) == ["config.json", "tokenizer_config.json"]
    assert list(resolve("cp", str(snap / "model.safetensors")).tensors) == ["w"]
    os.symlink("/dev/null", snap / "tokenizer.json")
    with pytest.raises(ResolveError, match="tokenizer.json is a symbolic link to a character device"):
        resolve("cp", str(snap))


def test_single_file_url_and_glob(tmp_path):
    _save(str(tmp_path / "g" / "x.safetensors"), a=torch.ones(2))
    _save(str(tmp_path / "g" / "y.safetensors"), b=torch.ones(3))
    assert list(resolve("cp", str(tmp_path / "g")).tensors) == ["a", "b"]
    assert list(resolve("cp", "file://" + str(tmp_path / "g" / "y.safetensors")).tensors) == ["b"]


def test_long_header_needs_a_second_read(tmp_path):
    tensors = {f"layer.{i}.a_rather_long_tensor_name_to_grow_the_header": torch.zeros(1) for i in range(2000)}
    _save(str(tmp_path / "big" / "model.safetensors"), **tensors)
    assert len(resolve("cp", str(tmp_path / "big")).tensors) == 2000


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "no such checkpoint"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"x")), "never unpickles"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "notes.txt"), "w").write("x")), "no .safetensors"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "model.safetensors"), "wb").write(b"\x01\x00")), "too short"),
    (lambda d: (os.makedirs(d), json.dump({"weight_map": {"w": "../../etc/x.safetensors"}},
                                          open(os.path.join(d, "model.safetensors.index.json"), "w"))), "refusing"),
    (lambda d: (os.makedirs(d), json.dump({"weight_map": {"w": "gone.safetensors"}},
                                          open(os.path.join(d, "model.safetensors.index.json"), "w"))), "not there"),
])
def test_bad_inputs_are_refused_with_their_name(tmp_path, setup, match):
    d = str(tmp_path / "bad")
    setup(d)
    with pytest.raises(ResolveError, match=match) as e:
        resolve("chat", d)
    assert "--chat" in str(e.value) and "\n" not in str(e.value)


def test_truncated_shard_is_refused(tmp_path):
    path = str(tmp_path / "t" / "model.safetensors")
    _save(path, w=torch.zeros(100))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(ResolveError, match="truncated"):
        resolve("base", str(tmp_path / "t"))
