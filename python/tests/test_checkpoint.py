"""Safetensors and checkpoint folders: round trips (single, sharded, 16-bit), the loader's checks,
and atomic saving."""

import json
import os
import shutil
import struct
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from common import FIXTURES, LOGITS_RTOL, config, gt, random_model, ref, rel_err
from gqe_torch import checkpoint, safetensors_io as st


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def raw_file(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


class Safetensors(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_round_trip_every_dtype(self):
        torch.manual_seed(0)
        tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.randn(7), "c": torch.randn(2, 2).half(),
                   "d": torch.randn(4, 1).bfloat16(), "e": torch.tensor([[-5, 7]], dtype=torch.int32),
                   "empty": torch.zeros(0, 3)}
        path = os.path.join(self.tmp, "x.safetensors")
        st.write_safetensors(path, tensors)
        back, dtypes, metadata = st.read_safetensors(path)
        self.assertEqual(list(back), list(tensors))
        self.assertEqual(dtypes, {"a": "F64", "b": "F32", "c": "F16", "d": "BF16", "e": "I32", "empty": "F32"})
        self.assertEqual(metadata, {"format": "pt"})
        for name, t in tensors.items():
            self.assertEqual(back[name].dtype, t.dtype)
            self.assertTrue(torch.equal(back[name], t), name)
        # The reference reads the same file to the same values (BF16 widened exactly).
        theirs = ref.read_safetensors(path)
        for name, t in tensors.items():
            np.testing.assert_array_equal(theirs[name], t.double().numpy() if t.is_floating_point() else t.numpy())
        (header_len,) = struct.unpack("<Q", read_bytes(path)[:8])
        self.assertEqual((8 + header_len) % 64, 0)  # data on a 64-byte boundary

    def test_bf16_rounds_to_nearest_even(self):
        # 1 + 2^-8 lies halfway between BF16 neighbours 1 and 1 + 2^-7: even mantissa wins (1).
        # 1 + 3*2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: even wins (1 + 2^-6).
        x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.7182817])
        path = os.path.join(self.tmp, "b.safetensors")
        st.write_safetensors(path, {"x": x}, {"x": "BF16"})
        words = ref.read_safetensors_full(path)[0]["x"]
        np.testing.assert_array_equal(words, ref.bf16_bits_to_float(ref.float_to_bf16_bits(x.numpy())))
        self.assertEqual(words[0], 1.0)
        self.assertEqual(words[1], 1 + 2 ** -6)

    def test_malformed_files_are_refused(self):
        four = struct.pack("<f", 1.0)
        cases = {
            "short": b"\x01\x00",
            "length past end": struct.pack("<Q", 1000) + b"{}",
            "length over limit": struct.pack("<Q", 100_000_001) + b"{}",
            "not json": struct.pack("<Q", 3) + b"{x}",
            "not an object": raw_file([1, 2]),
            "duplicate name": struct.pack("<Q", 99) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                              b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   ' + four,
            "unknown dtype": raw_file({"a": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            "size mismatch": raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, four),
            "negative dim": raw_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, four),
            "past data": raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, four),
            "overlap": raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, four),
            "gap": raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, four + four),
            "trailing bytes": raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, four + four),
            "field missing": raw_file({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, four),
            "metadata not strings": raw_file({"__metadata__": {"n": 1}}),
            # An escape of half a surrogate pair is no character; gqe's JSON parser refuses it.
            "lone surrogate": raw_file({"__metadata__": {"n": "\ud800"}}),
            # 2^62 * 2^2 elements of 4 bytes wrap to 0 in 64 bits; the count must not.
            "overflowing shape": raw_file({"a": {"dtype": "F32", "shape": [2 ** 62, 4], "data_offsets": [0, 0]}}),
            # No bytes, but an element count past 64 bits before the zero, as gqe refuses it.
            "overflow before a zero": raw_file({"a": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32, 0], "data_offsets": [0, 0]}}),
            "dimension past int64": raw_file({"a": {"dtype": "F32", "shape": [2 ** 64, 0], "data_offsets": [0, 0]}}),
            "too many dimensions": raw_file({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, four),
            "more than NumPy holds": raw_file({"a": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}, four),
            "nested too deeply": struct.pack("<Q", 10002) + b"[" * 5001 + b"]" * 5001,
        }
        # A null __metadata__ is none, as the format's own reader takes it.
        path = os.path.join(self.tmp, "null-metadata.safetensors")
        with open(path, "wb") as f:
            f.write(raw_file({"__metadata__": None, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, four))
        self.assertEqual(st.read_safetensors(path)[2], {})
        # A field besides dtype, shape and data_offsets is ignored, as by gqe and the format's reader.
        with open(path, "wb") as f:
            f.write(raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, four))
        self.assertEqual(st.read_safetensors(path)[0]["a"].tolist(), [1.0])
        for what, blob in cases.items():
            with self.subTest(case=what):
                path = os.path.join(self.tmp, "bad.safetensors")
                with open(path, "wb") as f:
                    f.write(blob)
                with self.assertRaises(gt.BadInput):
                    st.read_safetensors(path)


class Checkpoints(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def test_sharded_equals_single_bit_for_bit(self):
        model = random_model(config(gqe_top_k=2), 0)
        gt.save_pretrained(model, self.path("single"))
        gt.save_pretrained(model, self.path("sharded"), shard_bytes=4000)
        index = read_json(self.path("sharded/model.safetensors.index.json"))
        shards = sorted(set(index["weight_map"].values()))
        self.assertGreater(len(shards), 3)
        self.assertEqual(shards[0], f"model-00001-of-{len(shards):05d}.safetensors")
        self.assertEqual(sorted(os.listdir(self.path("sharded"))), sorted(shards + ["config.json",
                                                                                    "model.safetensors.index.json"]))
        sizes = sum(t.numel() * 4 for t in model.state_dict().values())
        self.assertEqual(index["metadata"]["total_size"], sizes)
        a, b = gt.load_pretrained(self.path("single")), gt.load_pretrained(self.path("sharded"))
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            self.assertTrue(torch.equal(x, y), name)
        self.assertTrue(torch.equal(logits_of(a, self.ids), logits_of(b, self.ids)))
        self.assertTrue(torch.equal(logits_of(a, self.ids), logits_of(model, self.ids)))

    def test_sharded_fixture_agrees_with_the_reference(self):
        fixture = os.path.join(FIXTURES, "gqe_k2_m3")
        expected = ref.read_safetensors(os.path.join(fixture, "expected.safetensors"))
        gt.save_pretrained(gt.load_pretrained(fixture), self.path("sharded"), shard_bytes=20000)
        model = gt.load_pretrained(self.path("sharded"))
        ids = [int(i) for i in expected["prompt_ids"]]
        self.assertLess(rel_err(logits_of(model, ids).numpy(), expected["logits"]), LOGITS_RTOL)

    def test_bf16_round_trip(self):
        model = random_model(config(), 1)
        gt.save_pretrained(model, self.path("bf16"), dtype="BF16")
        _, dtypes, _ = st.read_safetensors(self.path("bf16/model.safetensors"))
        self.assertEqual(set(dtypes.values()), {"BF16"})
        loaded = gt.load_pretrained(self.path("bf16"))
        for (name, w), back in zip(model.state_dict().items(), loaded.state_dict().values()):
            self.assertTrue(torch.equal(back, w.bfloat16().float()), name)  # rounded once, to nearest even
        # Saving the loaded model again changes nothing: BF16 values are exact in float32.
        gt.save_pretrained(loaded, self.path("again"), dtype="BF16")
        self.assertEqual(read_bytes(self.path("bf16/model.safetensors")), read_bytes(self.path("again/model.safetensors")))
        # And sharded BF16 too.
        gt.save_pretrained(loaded, self.path("bf16-sharded"), dtype="BF16", shard_bytes=3000)
        resharded = gt.load_pretrained(self.path("bf16-sharded"))
        self.assertTrue(torch.equal(logits_of(resharded, self.ids), logits_of(loaded, self.ids)))

    def test_16_and_64_bit_fixtures_load(self):
        for name, dtype in (("gqe_f16", "F16"), ("gqe_bf16", "BF16"), ("gqe_f64", "F64")):
            with self.subTest(fixture=name):
                folder = os.path.join(FIXTURES, name)
                _, dtypes, _ = checkpoint.read_checkpoint_tensors(folder)
                self.assertEqual(set(dtypes.values()), {dtype})
                stored = ref.read_safetensors(os.path.join(folder, "model.safetensors"))
                model = gt.load_pretrained(folder, dtype=torch.float64)
                for n, t in model.state_dict().items():
                    np.testing.assert_array_equal(t.numpy(), stored[n])  # widened exactly

    def write_folder(self, name, tensors, cfg):
        folder = self.path(name)
        os.makedirs(folder)
        st.write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        return folder

    def assertRefused(self, folder, *words):
        with self.assertRaises(gt.BadInput) as e:
            gt.load_pretrained(folder)
        for w in words:
            self.assertIn(w, str(e.exception))

    def test_wrong_tensor_sets_are_refused_by_name(self):
        cfg = config()
        good = dict(gt.GQEForCausalLM(cfg).state_dict())
        missing = dict(good)
        del missing["model.layers.1.self_attn.router.weight"]
        self.assertRefused(self.write_folder("missing", missing, cfg), "model.layers.1.self_attn.router.weight",
                           "missing")
        extra = dict(good, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
        self.assertRefused(self.write_folder("extra", extra, cfg), "model.layers.0.self_attn.q_proj.bias")
        shaped = dict(good, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 31)})
        self.assertRefused(self.write_folder("shape", shaped, cfg), "model.layers.0.mlp.up_proj.weight", "[40, 31]",
                           "[40, 32]")
        ints = dict(good, **{"model.norm.weight": torch.ones(32, dtype=torch.int32)})
        self.assertRefused(self.write_folder("ints", ints, cfg), "model.norm.weight", "dtype")
        tied = config(tie_word_embeddings=True)
        self.assertRefused(self.write_folder("tied", good, tied), "lm_head.weight", "tie_word_embeddings")
        wrong_config = config(gqe_variant="hard_concat")
        self.assertRefused(self.write_folder("variant", good, wrong_config), "o_proj")
        self.assertRefused(self.path("nowhere"), "not a folder")

    def test_every_malformed_checkpoint_of_the_cli_tests_is_refused(self):
        # tests/bad_checkpoints is what gqe-run and load_checkpoint refuse; the two readers must agree.
        root = os.path.join(os.path.dirname(FIXTURES), "bad_checkpoints")
        cases = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
        self.assertGreater(len(cases), 80)
        for case in cases:
            with self.subTest(case=case), self.assertRaises(gt.BadInput):
                gt.load_pretrained(os.path.join(root, case))

    def shard_folder(self, name):
        model = random_model(config(num_hidden_layers=1), 2)
        folder = self.path(name)
        gt.save_pretrained(model, folder, shard_bytes=2500)
        return folder, read_json(os.path.join(folder, "model.safetensors.index.json"))

    def test_shard_index_checks(self):
        def rewrite_index(folder, index):
            with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f)

        name = "model.layers.0.self_attn.router.weight"
        # The index names another shard than the one holding the tensor.
        folder, index = self.shard_folder("moved")
        other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
        index["weight_map"][name] = other
        rewrite_index(folder, index)
        self.assertRefused(folder, name)
        # A tensor in two shards (the index names one of them).
        folder, index = self.shard_folder("twice")
        shard = index["weight_map"][name]
        other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
        tensors, _, _ = st.read_safetensors(os.path.join(folder, other))
        tensors[name] = torch.zeros(8, 32)
        st.write_safetensors(os.path.join(folder, other), tensors)
        self.assertRefused(folder, name)
        # The index lists a tensor its shard does not hold.
        folder, index = self.shard_folder("absent")
        index["weight_map"]["model.extra.weight"] = index["weight_map"][name]
        rewrite_index(folder, index)
        self.assertRefused(folder, "model.extra.weight")
        # A shard outside the folder.
        folder, index = self.shard_folder("escape")
        index["weight_map"][name] = "../" + index["weight_map"][name]
        rewrite_index(folder, index)
        self.assertRefused(folder, name)
        # A missing shard file, and an index that is not an index.
        folder, index = self.shard_folder("lost")
        os.remove(os.path.join(folder, index["weight_map"][name]))
        self.assertRefused(folder, index["weight_map"][name])
        folder, _ = self.shard_folder("no-map")
        rewrite_index(folder, {"metadata": {}})
        self.assertRefused(folder, "weight_map")
        # JSON that gqe's reader refuses: NaN (Python's json writes and reads it), a key given twice.
        folder, index = self.shard_folder("nan")
        index["metadata"] = {"total_size": float("nan")}
        rewrite_index(folder, index)
        self.assertRefused(folder, "not valid JSON")
        folder, index = self.shard_folder("twice-in-json")
        path = os.path.join(folder, "model.safetensors.index.json")
        with open(path, "w") as f:
            f.write('{"metadata": {}, "metadata": {}, "weight_map": ' + json.dumps(index["weight_map"]) + "}")
        self.assertRefused(folder, "given twice")

    def test_index_wins_over_a_stray_single_file(self):
        folder, _ = self.shard_folder("stray")
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"not a safetensors file")
        gt.load_pretrained(folder)  # the index is read, the stray file is not

    def test_switching_layouts_keeps_other_files(self):
        model = random_model(config(), 3)
        folder = self.path("switch")
        gt.save_pretrained(model, folder, shard_bytes=5000)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("mine")
        gt.save_pretrained(model, folder)  # single file: the index and its shards go
        self.assertEqual(sorted(os.listdir(folder)), ["config.json", "model.safetensors", "notes.txt"])
        gt.save_pretrained(model, folder, shard_bytes=8000)  # sharded again: the single file goes
        names = os.listdir(folder)
        self.assertNotIn("model.safetensors", names)
        self.assertIn("notes.txt", names)
        self.assertTrue(torch.equal(logits_of(gt.load_pretrained(folder), self.ids), logits_of(model, self.ids)))

    def test_a_symlinked_weight_file_keeps_its_link(self):
        # Hugging Face's cache layout: the folder's model.safetensors links to a blob elsewhere.
        model = random_model(config(), 5)
        folder = self.path("snapshot")
        gt.save_pretrained(model, folder)
        blob = self.path("blob.safetensors")
        os.replace(os.path.join(folder, "model.safetensors"), blob)
        os.symlink(blob, os.path.join(folder, "model.safetensors"))
        gt.save_pretrained(random_model(config(), 6), folder)
        self.assertTrue(os.path.islink(os.path.join(folder, "model.safetensors")))
        self.assertEqual(read_bytes(blob), read_bytes(os.path.join(folder, "model.safetensors")))
        self.assertTrue(torch.equal(gt.load_pretrained(folder).lm_head.weight, random_model(config(), 6).lm_head.weight))

    def test_a_failed_save_leaves_no_partial_folder_or_file(self):
        model = random_model(config(), 4)
        calls = {"n": 0}
        real = checkpoint.serialize

        def fail_on_third(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
            return real(*args, **kw)

        # A new folder: staged beside its name, so after a failure it does not exist at all.
        with mock.patch.object(checkpoint, "serialize", fail_on_third):
            with self.assertRaises(gt.BadInput):
                gt.save_pretrained(model, self.path("new"), shard_bytes=4000)
        self.assertEqual(os.listdir(self.tmp), [])
        # An existing folder: every file is either the old one or the whole new one.
        folder = self.path("old")
        gt.save_pretrained(model, folder)
        before = read_bytes(os.path.join(folder, "model.safetensors"))
        with mock.patch.object(os, "replace", side_effect=OSError(5, "Input/output error")):
            with self.assertRaises(gt.BadInput):
                gt.save_pretrained(random_model(config(), 5), folder)
        self.assertEqual(sorted(os.listdir(folder)), ["config.json", "model.safetensors"])  # no temp files
        self.assertEqual(read_bytes(os.path.join(folder, "model.safetensors")), before)
        # A save that fails while switching layouts leaves the previous one loadable: here the new
        # single file cannot be written (a folder stands at its name), and the index stays.
        sharded, _ = self.shard_folder("switch_fails")
        was = logits_of(gt.load_pretrained(sharded), self.ids)
        os.mkdir(os.path.join(sharded, "model.safetensors"))
        with self.assertRaises(gt.BadInput):
            gt.save_pretrained(random_model(config(), 6), sharded)
        self.assertTrue(torch.equal(logits_of(gt.load_pretrained(sharded), self.ids), was))
        # An exception that is not the file system's (an interrupt, say) leaves no temporary file.
        with self.assertRaises(TypeError):
            st.write_atomically(os.path.join(folder, "config.json"), "text, not bytes")
        self.assertEqual(sorted(os.listdir(folder)), ["config.json", "model.safetensors"])
        # No folder named: refused, nothing written where the process runs.
        for bad in ("", None):
            with self.subTest(folder=bad), self.assertRaises(gt.BadInput):
                gt.save_pretrained(model, bad)
            with self.subTest(folder=bad), self.assertRaises(gt.BadInput):
                gt.load_pretrained(bad)
        with self.assertRaisesRegex(gt.BadInput, "expected a GQEForCausalLM"):
            gt.save_pretrained(torch.nn.Linear(2, 2), self.path("linear"))

    def test_load_options_are_checked(self):
        fixture = os.path.join(FIXTURES, "gqe_k2_m3")
        for options, words in ((dict(dtype="bf16"), "expected a torch floating-point dtype"),
                               (dict(dtype=torch.int64), "expected a torch floating-point dtype"),
                               (dict(device="gpu"), "is not a torch device")):
            with self.subTest(options=options), self.assertRaisesRegex(gt.BadInput, words):
                gt.load_pretrained(fixture, **options)
        if not torch.cuda.is_available():
            with self.assertRaisesRegex(gt.BadInput, "CUDA is not available"):
                gt.load_pretrained(fixture, device="cuda")
        self.assertEqual(gt.load_pretrained(fixture, dtype=torch.float64).lm_head.weight.dtype, torch.float64)


if __name__ == "__main__":
    unittest.main()
