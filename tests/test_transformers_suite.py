"""transformers' own model test-suite (ModelTesterMixin) on DINOv3 ViT models, plain and patched
by dinofast at construction: every test that passes on the plain model must pass patched.

The mixin comes from transformers' sources for the installed version (its PyPI sdist, fetched
once with pip into a cache directory, nothing of it copied into this repository). The sdist
ships tests/*.py but not tests/models/, tests/exporters/, tests/generation/ or tests/utils/: the
DINOv3 tester below is ours (the same tiny configuration as transformers' DINOv3 test), and the
three modules test_modeling_common imports from those folders are stood in for by empty mixins
(the export tests they would add are covered by test_dinov3.py's compile/export tests).

Cache: $DINOFAST_TRANSFORMERS_TESTS, else ~/.cache/dinofast/transformers-tests/<version>.
The module skips, naming why, when the sources cannot be obtained.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

import dinofast
from dinofast.models.dinov3 import is_patched

VERSION = transformers.__version__
PACKAGE = "transformers_tests"  # not "tests": that name is ours


def _cache_dir() -> Path:
    root = os.environ.get("DINOFAST_TRANSFORMERS_TESTS")
    return Path(root) if root else Path.home() / ".cache" / "dinofast" / "transformers-tests" / VERSION


def _extract_tests(archive: Path, dest: Path) -> None:
    """tests/*.py of the sdist (top level only) into dest/transformers_tests/; every member name is
    checked, so nothing lands outside dest."""
    prefix = f"transformers-{VERSION}/tests/"
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    pkg = tmp / PACKAGE
    pkg.mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rest = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if not member.isfile() or "/" in rest or not rest.endswith(".py") or rest.startswith("."):
                continue
            with tar.extractfile(member) as src:
                (pkg / rest).write_bytes(src.read())
    if not (pkg / "test_modeling_common.py").exists():
        raise RuntimeError(f"{archive.name} has no tests/test_modeling_common.py")
    (pkg / "__init__.py").touch()
    try:
        tmp.replace(dest)
    except OSError:  # another process extracted it first
        if not (dest / PACKAGE / "test_modeling_common.py").exists():
            raise


def _fetch_sources() -> Path:
    """The directory holding the transformers_tests package (downloaded on first use)."""
    dest = _cache_dir()
    if (dest / PACKAGE / "test_modeling_common.py").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", f"transformers=={VERSION}", "-d", download]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or len(archives) != 1:
            raise RuntimeError(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-500:]}")
        _extract_tests(archives[0], dest)
    return dest


def _stand_ins() -> None:
    """Modules test_modeling_common imports that the sdist lacks (see the module docstring), and
    `parameterized` (a transformers test dependency, not one of ours) when it is not installed."""
    for name, attrs in {
        f"{PACKAGE}.exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        f"{PACKAGE}.generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        f"{PACKAGE}.utils.test_configuration_utils": {"config_common_kwargs": {}},
    }.items():
        try:
            importlib.import_module(name)
        except ImportError:
            for i in (1, 2):
                parent = ".".join(name.split(".")[:i])
                sys.modules.setdefault(parent, types.ModuleType(parent))
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attrs)
    try:
        import parameterized  # noqa: F401
    except ImportError:
        sys.modules["parameterized"] = _parameterized_module()


def _parameterized_module() -> types.ModuleType:
    """parameterized.expand: one test method per parameter tuple, named test_x_<i>[_<first str>]."""
    import functools
    import inspect

    def expand(params, **_):
        def decorate(fn):
            frame_locals = inspect.currentframe().f_back.f_locals
            for i, args in enumerate(params):
                args = args if isinstance(args, (tuple, list)) else (args,)
                suffix = f"_{args[0]}" if args and isinstance(args[0], str) else ""

                def test(self, _args=tuple(args)):
                    return fn(self, *_args)

                name = f"{fn.__name__}_{i}{suffix}"
                frame_locals[name] = functools.update_wrapper(test, fn)
                frame_locals[name].__name__ = name
            fn.__test__ = False
            return fn
        return decorate

    module = types.ModuleType("parameterized")
    module.parameterized = types.SimpleNamespace(expand=expand)
    return module


try:
    sys.path.insert(0, str(_fetch_sources()))
    _stand_ins()
    common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    SOURCES_ERROR = None
except Exception as e:  # noqa: BLE001 (no network and no cache, or a layout this file does not know: skip, saying why)
    SOURCES_ERROR = f"transformers {VERSION} test sources unavailable: {type(e).__name__}: {e}"
    common = None

if SOURCES_ERROR is not None:
    @pytest.mark.skip(reason=SOURCES_ERROR)
    def test_transformers_suite_sources():
        pass
else:
    from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel

    class DINOv3ViTTester:
        """Tiny DINOv3 ViT configurations and inputs for ModelTesterMixin (transformers' own DINOv3
        test uses the same sizes: 30x30 images of 2x2 patches, hidden 32, 4 heads, 2 registers)."""

        def __init__(self, parent, batch_size=4, image_size=30, patch_size=2, hidden_size=32, layers=2,
                     heads=4, intermediate_size=37, registers=2):
            self.parent, self.batch_size, self.image_size = parent, batch_size, image_size
            self.patch_size, self.hidden_size, self.num_hidden_layers = patch_size, hidden_size, layers
            self.num_attention_heads, self.intermediate_size = heads, intermediate_size
            self.num_register_tokens = registers
            self.seq_length = (image_size // patch_size) ** 2 + 1 + registers
            self.mask_length = (image_size // patch_size) ** 2  # bool_masked_pos covers the patches
            self.num_masks = int(0.5 * self.seq_length)
            self.is_training = False

        def get_config(self):
            return DINOv3ViTConfig(
                image_size=self.image_size, patch_size=self.patch_size, num_channels=3,
                hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                hidden_act="gelu", initializer_range=0.02, num_register_tokens=self.num_register_tokens,
                out_indices=[0, 1], reshape_hidden_states=True)

        def prepare_config_and_inputs_for_common(self):
            pixels = common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
            return self.get_config(), {"pixel_values": pixels}

    class _Suite(common.ModelTesterMixin):
        all_model_classes = (DINOv3ViTModel, DINOv3ViTBackbone)
        test_resize_embeddings = False

        def setUp(self):
            self.model_tester = DINOv3ViTTester(self)

        def test_model_get_set_embeddings(self):  # the input "embeddings" are the patch Conv2d
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            for model_class in self.all_model_classes:
                model = model_class(config)
                self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
                self.assertIsNone(model.get_output_embeddings())

        def test_model_forward_shapes(self):
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = DINOv3ViTModel(config).eval()
            with torch.no_grad():
                out = model(**inputs)
            t = self.model_tester
            self.assertEqual(out.last_hidden_state.shape, (t.batch_size, t.seq_length, t.hidden_size))

        # Skipped for the plain model by transformers' DINOv3 test too:
        @unittest.skip(reason="DINOv3 takes pixel_values, no inputs_embeds")
        def test_inputs_embeds(self):
            pass

        @unittest.skip(reason="DINOv3 has no feed-forward chunking")
        def test_feed_forward_chunking(self):
            pass

    @unittest.skipUnless(os.environ.get("DINOFAST_TRANSFORMERS_BASELINE") == "1", reason=(
        "baseline: the suite on unpatched models tests transformers, not dinofast (it passed in full "
        "when this file was written); DINOFAST_TRANSFORMERS_BASELINE=1 runs it"))
    class TestPlainDINOv3(_Suite, unittest.TestCase):
        """The suite on transformers' models as they are (the baseline)."""

        def test_models_are_plain(self):
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            self.assertFalse(any(is_patched(c(config)) for c in self.all_model_classes))

    class TestPatchedDINOv3(_Suite, unittest.TestCase):
        """The same suite with every DINOv3ViTModel / DINOv3ViTBackbone patched by dinofast as it is
        built (direct construction, from_pretrained, from_config alike)."""

        def setUp(self):
            super().setUp()
            for cls in self.all_model_classes:
                patcher = mock.patch.object(cls, "__init__", _patching_init(cls.__init__))
                patcher.start()
                self.addCleanup(patcher.stop)

        def test_models_are_patched(self):
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            self.assertTrue(all(is_patched(c(config)) for c in self.all_model_classes))

    def _patching_init(init):
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            dinofast.patch_dinov3(self)
        return __init__
