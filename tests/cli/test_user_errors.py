"""One ``UserError`` family: raised wherever the user's input is at fault, and exactly what the CLI shows as one line.

The family's members are also the built-in types the Python API documents (``InputError`` is a ``ValueError``,
``UserTypeError`` a ``TypeError``, a missing file a ``FileNotFoundError``), so API callers catch what they did.
"""

import re
from pathlib import Path

import pytest
import torch

import aptvit
from aptvit.cli import main
from aptvit.core.io import InputError, MissingDependency, UserError, UserTypeError
from aptvit.data import check_image_folder

from ..tiny import tiny_vit
from .helpers import one_line

PACKAGE = Path(aptvit.__file__).resolve().parent


def test_every_raise_of_a_builtin_user_error_type_is_the_family():
    """aptvit raises no bare ValueError / TypeError / OSError (FileExistsError...) / ImportError: a raise statement is
    a check of the user's input, and such a check raises the family (the CLI decides by type only)."""
    import builtins

    kinds = (ValueError, TypeError, OSError, ImportError)  # what 0.1 took for the user's when raised on purpose
    names = [n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, kinds)]
    bare = re.compile(rf"raise ({'|'.join(names)})\(")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line) and path.name != "io.py"  # io.py raises an OSError inside writing(): mapped there
    ]
    assert found == []


def test_the_family_is_also_the_builtin_types():
    assert issubclass(InputError, ValueError) and issubclass(UserTypeError, TypeError)
    assert issubclass(MissingDependency, ImportError)
    with pytest.raises(FileNotFoundError) as info:
        check_image_folder("/nonexistent-folder", "train", required=True)
    assert isinstance(info.value, UserError)


def test_checkpoint_load_raises_one_family(tmp_path):
    """checkpoint.load: not a file, not a checkpoint, not a state dict: each a UserError (it raised three types)."""
    good = tmp_path / "m.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2)), good)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for bad in ("missing.safetensors", "junk.safetensors", "list.pth"):
        with pytest.raises(UserError):
            aptvit.load(tmp_path / bad)
    with pytest.raises(UserTypeError, match="APTViT"):
        aptvit.save(tiny_vit("vit_cls"), tmp_path / "x.safetensors")  # a timm model, not a converted one


def test_the_cli_maps_exactly_the_family_to_exit_code_2(tmp_path, capsys, monkeypatch):
    def raising(error):
        def show(*args, **kwargs):
            raise error

        return show

    for error in (InputError("bad --thing"), UserTypeError("not a ViT"), MissingDependency("pip install x")):
        monkeypatch.setattr("aptvit.viz.show", raising(error))
        assert main(["show", str(tmp_path / "x.png")]) == 2
        assert one_line(capsys.readouterr().err) == f"aptvit show: error: {error}"
    # any other error is a bug: it keeps its traceback (aptvit raises none on purpose: the test above)
    for error in (ValueError("a plain ValueError"), TypeError("a plain TypeError"), OSError("a plain OSError")):
        monkeypatch.setattr("aptvit.viz.show", raising(error))
        with pytest.raises(type(error), match="a plain"):
            main(["show", str(tmp_path / "x.png")])


def test_only_out_of_memory_says_out_of_memory(tmp_path, capsys, monkeypatch):
    from aptvit.models import HubError

    for error, says in ((HubError("could not load pretrained weights"), False), (torch.OutOfMemoryError("CUDA"), True)):
        monkeypatch.setattr("aptvit.viz.show", lambda *a, _e=error, **k: (_ for _ in ()).throw(_e))
        assert main(["show", str(tmp_path / "x.png")]) == 2
        assert ("out of memory" in one_line(capsys.readouterr().err)) == says
