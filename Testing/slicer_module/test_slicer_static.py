"""Static checks of the extension: CMake file lists, .ui names and tooltips, metadata, requirements, icon.

These read files only (plus one import in a child process); they fail with the exact lines to fix.
"""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "LensSegCalib"
MODULE_FILE = MODULE / "LensSegCalib.py"
UI_FILE = MODULE / "Resources" / "UI" / "LensSegCalib.ui"
#: Widgets a user edits or clicks: each needs a tooltip.
INPUT_WIDGET_CLASSES = {"qMRMLNodeComboBox", "QComboBox", "ctkSliderWidget", "ctkRangeWidget", "QCheckBox",
                        "QPushButton", "QSpinBox", "QDoubleSpinBox", "QLineEdit", "ctkPathLineEdit",
                        "ctkDirectoryButton", "qMRMLSegmentSelectorWidget"}


# ------------------------------------------------------------------------------------------------ CMake
def _ignored(paths: list) -> set:
    """Paths git ignores (build outputs, caches); empty when git is unavailable (plain source tree)."""
    if not paths:
        return set()
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--stdin"], input="\n".join(paths),
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(done.stdout.split())


def _module_files() -> tuple:
    """(scripts, resources) relative to LensSegCalib/, as the module CMakeLists must list them."""
    candidates = []
    for path in sorted(MODULE.rglob("*")):
        relative = path.relative_to(MODULE).as_posix()
        parts = relative.split("/")
        if not path.is_file() or "__pycache__" in parts or any(p.startswith(".") for p in parts):
            continue
        if parts[0] in ("LensSegCalibLib", "Resources", "Scripts") or relative == "LensSegCalib.py":
            candidates.append(relative)
    ignored = {Path(p).as_posix() for p in _ignored([f"LensSegCalib/{c}" for c in candidates])}
    kept = [c for c in candidates if f"LensSegCalib/{c}" not in ignored and not c.endswith(".pyc")]
    scripts = [c for c in kept if c.endswith(".py") and (c == "LensSegCalib.py" or c.startswith("LensSegCalibLib/"))]
    resources = [c for c in kept if c not in scripts]
    return scripts, resources


def _cmake_list(text: str, variable: str) -> list:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"LensSegCalib/CMakeLists.txt has no set({variable} ...)"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item.replace("${MODULE_NAME}", "LensSegCalib") for item in items if item]


@pytest.mark.parametrize("variable", ["MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"])
def test_module_cmake_lists_every_file(variable):
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = _cmake_list(text, variable)
    scripts, resources = _module_files()
    onDisk = scripts if variable == "MODULE_PYTHON_SCRIPTS" else resources
    missing = [f for f in onDisk if f not in listed]
    extra = [f for f in listed if f not in onDisk]
    assert not missing and not extra, (
        f"LensSegCalib/CMakeLists.txt, set({variable} ...) is out of date.\n"
        + ("Add these lines:\n" + "\n".join(f"  {f}" for f in missing) + "\n" if missing else "")
        + ("Remove these lines (no such file):\n" + "\n".join(f"  {f}" for f in extra) if extra else ""))
    assert len(listed) == len(set(listed)), f"{variable} lists a file twice"


def test_module_cmake_uses_the_scripted_module_macro_with_generic_tests():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file()


def test_extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    assert re.search(r"^project\(LensSegCalib\)", text, re.M)
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert "add_subdirectory(LensSegCalib)" in text
    # Icon and screenshot URLs must point at files that exist in the repository (raw GitHub URLs).
    urls = [values["EXTENSION_ICONURL"]] + values["EXTENSION_SCREENSHOTURLS"].split()
    for url in urls:
        assert url.startswith("https://raw.githubusercontent.com/") and "?" not in url, url
        relative = url.split("/main/", 1)[1]
        assert (ROOT / relative).is_file(), f"{url}: {relative} is not in the repository"


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "LensSegCalib.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ----------------------------------------------------------------------------------------------- .ui file
def _ui_widgets() -> dict:
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def test_every_widget_name_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    widgets = _ui_widgets()
    assert used, "no self.ui.<name> found: did the Widget stop using the .ui file?"
    assert sorted(used - set(widgets)) == []


def test_every_input_widget_has_a_tooltip():
    missing = []
    for name, widget in _ui_widgets().items():
        if widget.get("class") in INPUT_WIDGET_CLASSES:
            tips = [p for p in widget.findall("property") if p.get("name") == "toolTip"]
            if not tips or not (tips[0].findtext("string") or "").strip():
                missing.append(name)
    assert missing == []


def test_ui_parameter_names_are_parameter_node_fields():
    names = [p.findtext("string") for p in ET.parse(UI_FILE).iter("property") if p.get("name") == "SlicerParameterName"]
    source = MODULE_FILE.read_text()
    block = source.split("class LensSegCalibParameterNode:", 1)[1].split("\nclass ", 1)[0]
    fields = set(re.findall(r"^    (\w+):", block, re.M))
    assert names and sorted(set(names) - fields) == []


# ------------------------------------------------------------------------------------------- module text
def test_help_text_cites_every_method():
    text = MODULE_FILE.read_text()
    for citation in ("2508.08705", "2503.05107", "Murugesan", "Islam", "Glocker", "Valverde", "Tohka",
                     "2504.04458", "MONAI"):
        assert citation in text, citation


def test_importing_the_module_is_light():
    """Slicer imports every module at start-up: no torch/monai/scipy at import time."""
    code = ("import sys; sys.path.insert(0, 'Testing'); import headless_slicer; headless_slicer.start(); "
            "import LensSegCalib; "
            "print(sorted(m for m in ('torch', 'monai', 'scipy', 'SimpleITK') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_requirements_mirror_the_pyproject_pins():
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {p.split("==")[0].lower(): p for p in pins}
    for bundled in ("torch", "numpy", "simpleitk"):  # PyTorch extension / shipped with Slicer (see the file)
        expected.pop(bundled, None)
    lines = [line.strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    listed = {line.split("==")[0].lower(): line for line in lines if line and not line.startswith("#")}
    assert listed == expected


if __name__ == "__main__":  # print the two CMake lists as they should read (paste into LensSegCalib/CMakeLists.txt)
    for title, files in zip(("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"), _module_files()):
        print(f"set({title}\n" + "\n".join(f"  {f}" for f in files) + "\n  )")
