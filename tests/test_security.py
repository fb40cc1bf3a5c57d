"""Hostile input (issue 15, must-show 1): no code runs from a file that should be data.

Every attack here carries a payload that would create a marker file if any of its code ran
(`open(marker, "w")` from a pickle, a sympy string, a guard, or native code never loaded). Each
must fail with one error paragraph and a non-zero exit, and leave no marker. The bundle attacks
start from a real bundle and edit it as an attacker would, recomputing whatever checksum the
attack needs so that the check under test is the one that refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vdopt.bundle import MANIFEST, MANIFEST_CHECKSUM, read_manifest, staged_bundle
from vdopt.cli import main as vdopt_main
from vdopt.program import resolve_size
from vdopt.safety import UnsafeInputError, check_torch_expression, load_exported_program, shape_expression

WAN_INPUT = {"frames": {"min": 1, "max": 4}, "height": {"min": 4, "max": 8}, "width": {"min": 4, "max": 8}, "text_len": 7}


# ----- helpers --------------------------------------------------------------------------------

def write_recipe(path: Path, backend: str = "torch", **model) -> Path:
    path.write_text(yaml.safe_dump({"model": {"family": "wan", "input": WAN_INPUT, **model}, "sampler": {"steps": 2},
                                    "lower": {"backend": backend}}))
    return path


def refused(capsys, argv: list[str]) -> str:
    """Runs the CLI; asserts a non-zero exit and exactly one error paragraph, no traceback; returns it."""
    code = vdopt_main(argv)
    captured = capsys.readouterr()
    assert code != 0, f"accepted: {argv}"
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("vdopt ") and ": error: " in line]
    assert len(errors) == 1, captured.err
    return errors[0]


class Payload:
    """Unpickling this calls `open(marker, "w")`: the marker file appears iff the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rewrite_zip(source: Path, target: Path, edit) -> None:
    """Copies a zip archive member by member through `edit(name, data) -> data | None (drop)`; `edit` may
    also return a list of (name or ZipInfo, data) pairs to write instead."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = edit(info.filename, zin.read(info.filename))
            for name, data in (out if isinstance(out, list) else [] if out is None else [(info.filename, out)]):
                zout.writestr(name, data)


def rewrite_aoti_package(bundle: Path, tmp_path: Path, edit) -> Path:
    """The bundle's AOTI package rewritten in place through `rewrite_zip`'s `edit`; returns its path."""
    package = bundle / package_name(bundle)
    original = tmp_path / "orig.pt2"
    shutil.move(package, original)
    rewrite_zip(original, package, edit)
    return package


def edit_graph_json(edit):
    def apply(name: str, data: bytes):
        if name.endswith("models/model.json"):
            graph = json.loads(data)
            edit(graph)
            return json.dumps(graph).encode()
        return data
    return apply


def reseal(bundle: Path, edit=None, files: tuple[str, ...] = ()) -> None:
    """What an attacker who edits a bundle does: change the manifest, recompute the checksum entries of
    `files`, and recompute manifest.sha256 so the manifest itself verifies."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    if edit:
        edit(manifest)
    for name in files:
        manifest["checksums"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    text = json.dumps(manifest, indent=2).encode()
    (bundle / MANIFEST).write_bytes(text)
    (bundle / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")


def segment_name(bundle: Path) -> str:
    return json.loads((bundle / MANIFEST).read_text())["segments"][0]["files"][0]


# ----- fixtures -------------------------------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return (self.proj(x) * 2,)


@pytest.fixture(scope="module")
def tiny_program(tmp_path_factory) -> Path:
    """A legitimate .pt2 with a dynamic dim (so its graph JSON holds symbolic size strings)."""
    ep = torch.export.export(Tiny(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=8)},))
    path = tmp_path_factory.mktemp("programs") / "tiny.pt2"
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def wan_bundle(tmp_path_factory, wan_checkpoint) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    bundle = directory / "wan.vdopt"
    assert vdopt_main(["compile", str(write_recipe(directory / "r.yaml")), str(wan_checkpoint), "-o", str(bundle)]) == 0
    save_file({"cond.encoder_hidden_states": torch.randn(1, 7, 16)}, str(directory / "cond.safetensors"))
    return bundle


@pytest.fixture(scope="module")
def aoti_bundle(tmp_path_factory, wan_checkpoint) -> Path:
    """One real AOTInductor bundle (a native .so inside the package); compiled once for the module."""
    directory = tmp_path_factory.mktemp("aoti")
    bundle = directory / "wan_aoti.vdopt"
    recipe = directory / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4, "text_len": 7}},
                                      "sampler": {"steps": 2}, "lower": {"backend": "aoti"}}))
    assert vdopt_main(["compile", str(recipe), str(wan_checkpoint), "-o", str(bundle)]) == 0
    save_file({"cond.encoder_hidden_states": torch.randn(1, 7, 16)}, str(directory / "cond.safetensors"))
    return bundle


@pytest.fixture
def copy_of(tmp_path):
    def make(bundle: Path) -> Path:
        target = tmp_path / bundle.name
        shutil.copytree(bundle, target)
        shutil.copy(bundle.parent / "cond.safetensors", tmp_path / "cond.safetensors")
        return target
    return make


def run_argv(bundle: Path, tmp_path: Path) -> list[str]:
    return ["run", str(bundle), "--cond", str(bundle.parent / "cond.safetensors"), "-o", str(tmp_path / "v.pt"), "--quiet"]


# ----- malicious .pt2 and .pt ---------------------------------------------------------------------

def crafted_programs(tiny: Path, directory: Path, marker: Path) -> dict[str, Path]:
    """Three routes by which torch.export.load / .module() run code from a .pt2 file."""
    out = {}

    def sample_inputs(name, data):  # unpickled with weights_only=False when weights-only fails
        return pickle.dumps(Payload(marker), protocol=2) if name.endswith("sample_inputs/model.pt") else data

    def weights(name, data):  # a weight stored as a pickle, loaded with weights_only=False
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/weights/weight_" in name:
            buffer = __import__("io").BytesIO()
            torch.save(Payload(marker), buffer)
            return buffer.getvalue()
        return data

    def sympy_string(graph):  # sympy.sympify evaluates the archive's size strings
        text = json.dumps(graph)
        assert '"expr_str": "Symbol' in text
        graph.clear()
        graph.update(json.loads(text.replace('"expr_str": "Symbol', f'"expr_str": "open({str(marker)!r}, \'w\') and Symbol', 1)))

    def guard(graph):  # ExportedProgram.module() execs guards_code
        graph["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]

    def guard_string_breakout(graph):  # a plain comparison whose string, pasted into torch's quoted message, is code
        graph["guards_code"] = [f"L['x'].size()[0] >= 0 or 'a\"+str(open(\"{marker}\", \"w\"))+\"b' == 'a'"]

    for name, edit in (("sample_inputs", sample_inputs), ("pickled_weight", weights),
                       ("sympy_string", edit_graph_json(sympy_string)), ("guard_code", edit_graph_json(guard)),
                       ("guard_string_breakout", edit_graph_json(guard_string_breakout))):
        out[name] = directory / f"{name}.pt2"
        rewrite_zip(tiny, out[name], edit)
    return out


ATTACKS = ("sample_inputs", "pickled_weight", "sympy_string", "guard_code", "guard_string_breakout")


@pytest.mark.parametrize("attack", ATTACKS)
def test_malicious_pt2_is_refused_by_the_loader(tmp_path, tiny_program, attack):
    marker = tmp_path / "PWNED"
    path = crafted_programs(tiny_program, tmp_path, marker)[attack]
    with pytest.raises(UnsafeInputError) as info:
        load_exported_program(path).module()(torch.randn(3, 4))
    message = str(info.value)
    assert str(path) in message and "run code" in message and "--trust-pickle" in message and "\n" not in message
    assert not marker.exists()


def test_the_unguarded_loader_does_run_these(tmp_path, tiny_program):
    """The attacks are real: plain torch.export.load (what --trust-pickle uses) runs each payload."""
    for attack, path in crafted_programs(tiny_program, tmp_path, tmp_path / "PWNED").items():
        try:
            torch.export.load(str(path)).module()(torch.randn(3, 4))
        except Exception:  # noqa: BLE001 - the payload runs before torch notices anything odd
            pass
        assert (tmp_path / "PWNED").exists(), attack
        (tmp_path / "PWNED").unlink()


def test_a_legitimate_pt2_loads_and_runs(tiny_program):
    x = torch.randn(3, 4)
    torch.testing.assert_close(load_exported_program(tiny_program).module()(x), torch.export.load(str(tiny_program)).module()(x))


@pytest.mark.parametrize("attack", ATTACKS)
def test_compile_refuses_a_malicious_pt2(tmp_path, capsys, tiny_program, attack):
    marker = tmp_path / "PWNED"
    path = crafted_programs(tiny_program, tmp_path, marker)[attack]
    recipe = write_recipe(tmp_path / "r.yaml", layout="exported_program")
    message = refused(capsys, ["compile", str(recipe), str(path), "-o", str(tmp_path / "out.vdopt")])
    assert "run code" in message and "--trust-pickle" in message
    assert not marker.exists() and not (tmp_path / "out.vdopt").exists()


def test_compile_refuses_a_malicious_pt2_in_a_fresh_process(tmp_path, tiny_program):
    marker = tmp_path / "PWNED"
    path = crafted_programs(tiny_program, tmp_path, marker)["sample_inputs"]
    recipe = write_recipe(tmp_path / "r.yaml", layout="exported_program")
    result = subprocess.run([sys.executable, "-m", "vdopt.cli", "compile", str(recipe), str(path), "-o", str(tmp_path / "o.vdopt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "run code" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("attack", ATTACKS)
def test_inspect_reads_a_malicious_pt2_without_running_it(tmp_path, capsys, tiny_program, attack):
    marker = tmp_path / "PWNED"
    path = crafted_programs(tiny_program, tmp_path, marker)[attack]
    assert vdopt_main(["inspect", str(path)]) == 0
    assert "Linear" in capsys.readouterr().out
    assert not marker.exists()


def test_malicious_pt_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "weights.pt"
    torch.save({"blocks.0.weight": Payload(marker)}, checkpoint)
    for layout in ("state_dict", "pickled_module"):
        recipe = write_recipe(tmp_path / f"{layout}.yaml", layout=layout)
        message = refused(capsys, ["compile", str(recipe), str(checkpoint), "-o", str(tmp_path / "out.vdopt")])
        assert "--trust-pickle" in message and "weights.pt" in message
    assert not marker.exists()


# ----- manifest shape strings ------------------------------------------------------------------

EVIL_SIZES = ["__import__('os').system('touch PWNED')", "open('PWNED', 'w') and 1", "frames.__class__", "frames ** 99",
              "lambda: 1", "[frames]", "'frames'", "frames if 1 else 2", "f'{1}'", "1; 2", "x" * 300]


@pytest.mark.parametrize("size", EVIL_SIZES)
def test_size_grammar_refuses_code(size):
    with pytest.raises(ValueError):
        resolve_size(size, {"frames": 2, "height": 8, "width": 8}, [1, 2, 2])


def test_size_grammar_accepts_what_compile_writes():
    sizes, multiples = {"frames": 3, "height": 8, "width": 12}, [1, 2, 2]
    assert resolve_size("32*frames*height_units*width_units", sizes, multiples) == 32 * 3 * 4 * 6
    assert resolve_size("(2*frames + 1)//3 - -1", sizes, multiples) == (2 * 3 + 1) // 3 + 1
    assert resolve_size(7, sizes, multiples) == 7
    shape_expression("frames", {"frames"})


@pytest.mark.parametrize("where", ["state", "inputs"])
def test_manifest_shape_string_is_refused_at_open(tmp_path, capsys, wan_bundle, copy_of, where):
    bundle = copy_of(wan_bundle)
    marker = Path.cwd() / "PWNED"
    payload = f"open({str(tmp_path / 'PWNED')!r}, 'w') and frames"

    def edit(m):
        if where == "state":
            m["state"].append({"name": "evil", "shape": [1, payload], "dtype": "float32", "init": "zeros"})
        else:
            m["inputs"][0]["shape"][2] = payload

    reseal(bundle, edit)
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert "not a size expression" in message and f"{where}[" in message
    assert not (tmp_path / "PWNED").exists() and not marker.exists() and not (tmp_path / "v.pt").exists()


def test_torch_expression_check():
    check_torch_expression("Add(Mul(Integer(2), Symbol('s77', positive=True, integer=True)), Integer(3))")
    check_torch_expression("L['x'].size()[0] <= 8 and math.isnan(L['y'])", guard=True)
    for bad in ["__import__('os')", "Symbol('s', positive=open('x'))", "torch.os.system('x')", "().__class__",
                "L.__dict__", "exec('1')", "1)\nimport os"]:
        with pytest.raises(ValueError):
            check_torch_expression(bad, guard=True)


# ----- the bundle: manifest checksum, swapped / unlisted segments -------------------------------

def test_swapped_segment_with_its_entry_recomputed(tmp_path, capsys, wan_bundle, copy_of, tiny_program):
    """The attacker replaces the segment and fixes its checksum entry; manifest.sha256 no longer matches."""
    bundle = copy_of(wan_bundle)
    segment = segment_name(bundle)
    marker = tmp_path / "PWNED"
    shutil.copy(crafted_programs(tiny_program, tmp_path, marker)["sample_inputs"], bundle / segment)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["checksums"][segment] = hashlib.sha256((bundle / segment).read_bytes()).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert MANIFEST_CHECKSUM in message and "edited" in message
    assert not marker.exists() and not (tmp_path / "v.pt").exists()
    refused(capsys, ["inspect", str(bundle), "--graph"])


def test_segment_entry_deleted(tmp_path, capsys, wan_bundle, copy_of):
    bundle = copy_of(wan_bundle)
    segment = segment_name(bundle)
    reseal(bundle, lambda m: m["checksums"].pop(segment))
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert segment in message and "checksums" in message


def test_manifest_checksum_deleted(tmp_path, capsys, wan_bundle, copy_of):
    bundle = copy_of(wan_bundle)
    (bundle / MANIFEST_CHECKSUM).unlink()
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert MANIFEST_CHECKSUM in message and "missing" in message


def test_unlisted_segment(tmp_path, capsys, wan_bundle, copy_of, tiny_program):
    """A new segment file the manifest points at, with no checksum entry (manifest.sha256 recomputed)."""
    bundle = copy_of(wan_bundle)
    marker = tmp_path / "PWNED"
    shutil.copy(crafted_programs(tiny_program, tmp_path, marker)["guard_code"], bundle / "segments" / "evil.pt2")
    reseal(bundle, lambda m: m["segments"][0].update(files=["segments/evil.pt2"]))
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert "segments/evil.pt2" in message and "checksums" in message
    assert not marker.exists()


def test_unlisted_file_added(tmp_path, capsys, wan_bundle, copy_of):
    bundle = copy_of(wan_bundle)
    (bundle / "segments" / "extra.so").write_bytes(b"\x7fELF")
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert "segments/extra.so" in message and "not in its manifest's checksums" in message


# ----- out-of-bundle paths ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "checksum_absolute", "checksum_dotdot", "checksum_symlink"])
def test_out_of_bundle_paths(tmp_path, capsys, wan_bundle, copy_of, tiny_program, kind):
    bundle = copy_of(wan_bundle)
    marker = tmp_path / "PWNED"
    outside = tmp_path / "outside.pt2"
    shutil.copy(crafted_programs(tiny_program, tmp_path, marker)["sample_inputs"], outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    segment = segment_name(bundle)
    relative = os.path.relpath(outside, bundle)
    if kind == "absolute":
        reseal(bundle, lambda m: (m["segments"][0].update(files=[str(outside)]), m["checksums"].update({str(outside): digest})))
    elif kind == "dotdot":
        reseal(bundle, lambda m: (m["segments"][0].update(files=[relative]), m["checksums"].update({relative: digest})))
    elif kind == "symlink":
        (bundle / segment).unlink()
        (bundle / segment).symlink_to(outside)
        reseal(bundle, files=(segment,))
    elif kind == "checksum_absolute":
        reseal(bundle, lambda m: m["checksums"].update({"/etc/passwd": hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()}))
    elif kind == "checksum_dotdot":
        reseal(bundle, lambda m: m["checksums"].update({relative: digest}))
    else:
        (bundle / "extras").mkdir(exist_ok=True)
        (bundle / "extras" / "passwd").symlink_to("/etc/passwd")
        reseal(bundle, lambda m: m["checksums"].update({"extras/passwd": hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()}))
    for argv in (run_argv(bundle, tmp_path), ["inspect", str(bundle)], ["inspect", str(bundle), "--graph"]):
        message = refused(capsys, argv)
        assert any(word in message for word in ("outside the bundle", "symlink")), message
    assert not marker.exists() and not (tmp_path / "v.pt").exists()
    with pytest.raises(UnsafeInputError):
        read_manifest(bundle)


@pytest.mark.parametrize("location", ["/etc/hostname", "../../outside.bin", "unlisted.bin"])
def test_onnx_external_data_outside_the_bundle(tmp_path, capsys, wan_bundle, copy_of, location):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bundle = copy_of(wan_bundle)
    (tmp_path / "outside.bin").write_bytes(b"secret!!")
    (bundle / "segments" / "unlisted.bin").write_bytes(b"secret!!")
    weight = numpy_helper.from_array(np.zeros(4, dtype=np.uint8), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bundle / "segments" / "step_0.onnx"))
    (bundle / segment_name(bundle)).unlink()
    listed = ("segments/step_0.onnx",) + (("segments/unlisted.bin",) if location != "unlisted.bin" else ())
    reseal(bundle, lambda m: (m["segments"][0].update(backend="onnx", files=["segments/step_0.onnx"]),
                              m["checksums"].pop(segment_name(wan_bundle))), files=listed)
    if location == "unlisted.bin":  # present in the directory but not listed: refused as unlisted already
        (bundle / "segments" / "unlisted.bin").unlink()
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert location in message or "outside the bundle" in message, message
    assert not (tmp_path / "v.pt").exists()


# ----- AOTI packages: swapped .so, zip-slip ------------------------------------------------------

def package_name(bundle: Path) -> str:
    name = segment_name(bundle)
    assert name.endswith(".aoti.pt2")
    return name


def test_aoti_bundle_runs(tmp_path, aoti_bundle):
    assert vdopt_main(run_argv(aoti_bundle, tmp_path)) == 0


@pytest.mark.parametrize("recompute", ["nothing", "entry"])
def test_swapped_aoti_so(tmp_path, capsys, aoti_bundle, copy_of, recompute):
    bundle = copy_of(aoti_bundle)
    sos = []

    def swap(name, data):
        if name.endswith(".so"):
            sos.append(name)
            return data[:-64] + b"\x90" * 64  # a different native library, same size
        return data

    package = rewrite_aoti_package(bundle, tmp_path, swap)
    assert sos, "the AOTI package holds no .so"
    if recompute == "entry":
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["checksums"][package_name(bundle)] = hashlib.sha256(package.read_bytes()).hexdigest()
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert (MANIFEST_CHECKSUM if recompute == "entry" else "does not match its checksum") in message
    assert not (tmp_path / "v.pt").exists()


@pytest.mark.parametrize("member", ["../../SLIPPED", "/tmp/vdopt_SLIPPED_abs", "symlink"])
def test_zip_slip_member_in_aoti_package(tmp_path, capsys, aoti_bundle, copy_of, member):
    """Checksums all recomputed: the member check before extraction is what refuses it."""
    bundle = copy_of(aoti_bundle)
    first = []

    def add(name, data):
        out = [(name, data)]
        if not first:
            first.append(name)
            if member == "symlink":
                info = zipfile.ZipInfo(name.split("/")[0] + "/data/link")
                info.external_attr = (0o120777 << 16)
                out.append((info, str(tmp_path)))
            else:
                out.append((member if member.startswith("/") else name.split("/")[0] + "/" + member, b"slipped"))
        return out

    rewrite_aoti_package(bundle, tmp_path, add)
    reseal(bundle, files=(package_name(bundle),))
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert "zip-slip" in message
    assert not list(tmp_path.rglob("SLIPPED")) and not list(bundle.parent.parent.rglob("SLIPPED"))
    assert not Path("/tmp/vdopt_SLIPPED_abs").exists() and not (tmp_path / "v.pt").exists()


def test_an_aoti_package_given_as_a_program_is_refused(tmp_path, capsys, aoti_bundle):
    """torch.export.load would dlopen the package's .so (native code runs on load)."""
    package = aoti_bundle / package_name(aoti_bundle)
    recipe = write_recipe(tmp_path / "r.yaml", layout="exported_program")
    message = refused(capsys, ["compile", str(recipe), str(package), "-o", str(tmp_path / "out.vdopt")])
    assert "AOTInductor native code" in message and "--trust-pickle" in message


# ----- inspect never loads code --------------------------------------------------------------------

def test_inspect_never_loads_code(tmp_path, capsys, monkeypatch, wan_bundle, aoti_bundle, tiny_program):
    def forbidden(*args, **kwargs):
        raise AssertionError("inspect loaded code")

    import torch._inductor

    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    for argv in (["inspect", str(wan_bundle), "--graph"], ["inspect", str(aoti_bundle), "--graph"], ["inspect", str(tiny_program)]):
        assert vdopt_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "matching families: wan" in out and "Linear" in out


def test_inspect_prints_the_verify_record(tmp_path, capsys, wan_bundle, copy_of):
    bundle = copy_of(wan_bundle)
    report = {"prompts": 4, "psnr_mean": 31.2, "psnr_min": 29.0, "psnr_p5": 29.3, "accuracy": {"shape": 0.98, "colour": 1.0},
              "budget": {"psnr_min": 30}, "passed": False}
    reseal(bundle, lambda m: m.update(verify=report))
    assert vdopt_main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "verify: FAILED on 4 prompt(s); PSNR dB mean 31.20, min 29.00, p5 29.30" in out
    assert "accuracy: shape 0.98; colour 1.0" in out and "budget: psnr_min 30" in out


@pytest.mark.parametrize("edit", [
    lambda m: m["latent"].update(dtype="os.system"), lambda m: m["latent"].update(multiples=[1, 0]),
    lambda m: m["segments"][0].update(dims="everything"), lambda m: m["inputs"][0].update(dtype=None),
    lambda m: m["state"].append("x"), lambda m: m.update(num_steps=-1), lambda m: m.pop("latent"),
    lambda m: m["segments"][0].update(files="segments/step_0.pt2"), lambda m: m.update(segments={"a": 1}),
    lambda m: m["checksums"].update({"segments/step_0.pt2": "not a digest"}),
])
def test_edited_manifest_fields_are_one_paragraph(tmp_path, capsys, wan_bundle, copy_of, edit):
    bundle = copy_of(wan_bundle)
    reseal(bundle, edit)
    message = refused(capsys, run_argv(bundle, tmp_path))
    assert "manifest" in message and "recompile" in message.lower()


@pytest.mark.parametrize("damage", ["[]", "{" * 100000, json.dumps({"schema_version": 1}), "\xff\xfe", "x" * 100])
def test_damaged_manifest_with_matching_checksum_is_one_paragraph(tmp_path, capsys, wan_bundle, copy_of, damage):
    bundle = copy_of(wan_bundle)
    data = damage.encode("latin-1")
    (bundle / MANIFEST).write_bytes(data)
    (bundle / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")
    refused(capsys, run_argv(bundle, tmp_path))
    refused(capsys, ["inspect", str(bundle)])


# ----- -o: a user's files are never deleted or replaced without --force (must-show 3) -------------

def tiny_manifest(tag: str) -> dict:
    return {"family": "wan", "inputs": [], "outputs": [], "state": [], "step_table": {}, "tag": tag,
            "segments": [{"name": "step_0", "backend": "torch", "files": ["segments/step_0.bin"], "dims": {}}]}


def write_tiny_bundle(destination: Path, tag: str, overwrite: bool = True) -> None:
    with staged_bundle(destination, overwrite=overwrite) as stage:
        (stage / "segments").mkdir()
        (stage / "segments" / "step_0.bin").write_bytes(tag.encode() * 1000)
        from vdopt.bundle import write_manifest

        write_manifest(stage, tiny_manifest(tag))


def debris(destination: Path) -> list[str]:
    return sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(f".{destination.name}."))


def test_compile_into_an_ordinary_directory_or_file_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    directory = tmp_path / "photos"
    directory.mkdir()
    (directory / "holiday.jpg").write_bytes(b"precious")
    document = tmp_path / "thesis.pdf"
    document.write_bytes(b"years of work")
    for target, what in ((directory, "not a vdopt bundle"), (document, "existing file")):
        for force in ([], ["--force"]):
            message = refused(capsys, ["compile", str(recipe), "-o", str(target), *force])
            assert what in message and "never" in message
    assert (directory / "holiday.jpg").read_bytes() == b"precious" and sorted(os.listdir(directory)) == ["holiday.jpg"]
    assert document.read_bytes() == b"years of work"
    link = tmp_path / "link.vdopt"
    link.symlink_to(directory)
    assert "symlink" in refused(capsys, ["compile", str(recipe), "-o", str(link), "--force"])
    assert debris(directory) == [] and debris(document) == []


def test_existing_bundle_needs_force(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    bundle = tmp_path / "b.vdopt"
    write_tiny_bundle(bundle, "old")
    before = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    message = refused(capsys, ["compile", str(recipe), "-o", str(bundle)])
    assert "--force" in message and "already exists" in message
    message = refused(capsys, ["compile", str(recipe), "-o", str(bundle), "--no-force"])
    assert "--force" in message
    assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert vdopt_main(["compile", str(recipe), "-o", str(bundle), "--force"]) == 0
    assert read_manifest(bundle)["family"] == "wan" and "tag" not in read_manifest(bundle)
    assert debris(bundle) == []


def test_an_empty_directory_is_fine(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write_tiny_bundle(target, "new", overwrite=False)
    assert read_manifest(target)["tag"] == "new"


def test_a_failed_compile_leaves_the_old_bundle(tmp_path):
    bundle = tmp_path / "b.vdopt"
    write_tiny_bundle(bundle, "old")
    with pytest.raises(RuntimeError):
        with staged_bundle(bundle) as stage:
            (stage / "half").write_bytes(b"x")
            raise RuntimeError("compile failed")
    assert read_manifest(bundle)["tag"] == "old" and debris(bundle) == []


KILL_SCRIPT = r"""
import os, sys
from pathlib import Path
import vdopt.bundle as b
from tests.test_security import tiny_manifest
destination, stage = Path(sys.argv[1]), sys.argv[2]
die = lambda: os._exit(137)
real_rename, real_exchange, real_rmtree = os.rename, b._exchange, b.shutil.rmtree
renames = []
def rename(src, dst):
    real_rename(src, dst)
    renames.append(dst)
    if stage == f"fallback_rename_{len(renames)}":
        die()
if stage.startswith("fallback"):
    b._exchange = lambda a, c: False
    os.rename = rename
if stage == "after_exchange":
    b._exchange = lambda a, c: (real_exchange(a, c), die())
if stage == "during_cleanup":
    b.shutil.rmtree = lambda *a, **k: die()
with b.staged_bundle(destination, overwrite=True) as staging:
    (staging / "segments").mkdir()
    (staging / "segments" / "step_0.bin").write_bytes(b"new" * 1000)
    if stage == "while_writing":
        die()
    b.write_manifest(staging, tiny_manifest("new"))
    if stage == "before_replace":
        die()
"""

STAGES = {"while_writing": "old", "before_replace": "old", "after_exchange": "new", "during_cleanup": "new",
          "fallback_rename_1": None, "fallback_rename_2": "new", "fallback_cleanup": "new"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_replace_leaves_old_or_new_bundle(tmp_path, stage):
    """A compile replacing a bundle is killed (os._exit, no cleanup runs) at each stage of the replace: the
    path holds the old or the new bundle, complete and verifying; the next compile clears the debris.
    On Linux the replace is an atomic exchange; the two-rename fallback (other systems) has one
    instant with nothing at the path, which the next compile repairs by restoring the old bundle."""
    bundle = tmp_path / "b.vdopt"
    write_tiny_bundle(bundle, "old")
    root = Path(__file__).resolve().parents[1]
    script_stage = "fallback_rename_3" if stage == "fallback_cleanup" else stage
    if stage == "fallback_cleanup":  # die in the rmtree of the retired bundle
        script = KILL_SCRIPT.replace('if stage == "during_cleanup":', 'if stage in ("during_cleanup", "fallback_rename_3"):')
    else:
        script = KILL_SCRIPT
    result = subprocess.run([sys.executable, "-c", script, str(bundle), script_stage], cwd=root, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 137, result.stderr
    expected = STAGES[stage]
    if expected is None:
        assert not bundle.exists() and any(name.endswith(".retired") for name in debris(bundle))
    else:
        assert read_manifest(bundle)["tag"] == expected
    write_tiny_bundle(bundle, "next")  # the next compile: cleans up, then replaces
    assert read_manifest(bundle)["tag"] == "next" and debris(bundle) == []


def test_stale_partials_of_killed_compiles_are_cleaned_but_live_ones_kept(tmp_path):
    bundle = tmp_path / "b.vdopt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".b.vdopt.{dead}.abc123.partial"
    live = tmp_path / f".b.vdopt.{os.getppid()}.def456.partial"
    for d in (stale, live):
        d.mkdir()
        (d / "junk").write_bytes(b"x" * 100)
    write_tiny_bundle(bundle, "new")
    assert not stale.exists() and live.exists()
