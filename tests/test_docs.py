"""The README and docs/ stay true: the README's size, its two set-up commands (the second is what
CI runs), the code lines it points at, and every file, link and command the pages name."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob(
    "*.md"))]}


def test_the_readme_is_short_and_opens_with_the_two_commands():
    assert len(README.splitlines()) <= 250 and len(README.encode()) <= 20_000
    commands = [line.strip() for line in README.splitlines() if line.startswith("    pip ")]
    assert commands[0] == "pip install -r requirements.txt && python train.py"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert ci.replace("pip install -q", "pip install") == commands[1]


def test_the_code_the_readme_points_at_is_there():
    """`file.py:N Name`: line N of file.py defines Name."""
    references = re.findall(r"`(\w+\.py):(\d+) (\w+)`", README)
    assert len(references) >= 8
    for file, line, name in references:
        text = (ROOT / file).read_text().splitlines()[int(line) - 1]
        assert re.match(rf"\s*(class|def) {name}\b", text), (file, line, name, text)


def test_every_link_and_image_of_the_pages_exists():
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


def test_every_command_of_the_pages_exists():
    """`python -m tools.X` and `python X.py` (also under torchrun) name files of the project."""
    for page, text in PAGES.items():
        for module in re.findall(r"-m (tools\.\w+)", text):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), (page.name, module)
        for script in re.findall(r"(?:python|torchrun [^\n]*?) (\w+\.py)\b", text):
            assert (ROOT / script).is_file(), (page.name, script)


def test_the_readme_python_example_runs_as_written():
    """The README's ```python block, executed as it stands: one prediction per branch at its
    resolution, the loss equal to sum_r alpha_r mean((eps_r - target_r)^2) written out here with
    the targets sum-pooled over k x k and divided by k, a gradient for every parameter but the TD
    slopes and offsets w, b (zero at initialisation, where p0 = p1: d/dw of
    p1 + sigmoid((1 + w) t~ + b) (p0 - p1) carries the factor p0 - p1), and three 8x8 samples."""
    import torch
    import torch.nn.functional as F

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 15
    torch.manual_seed(0)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    predictions, eps = scope["predictions"], scope["eps"]
    assert [tuple(p.shape) for p in predictions] == [(4, 1, 4, 4), (4, 1, 8, 8)]
    target_4x4 = F.avg_pool2d(eps, 2) * 4 / 2                # sum over 2x2, divided by 2
    expected = (0.25 * ((predictions[0] - target_4x4) ** 2).mean()
                + ((predictions[1] - eps) ** 2).mean())
    assert abs(scope["loss"].item() - expected.item()) < 1e-6
    for name, p in scope["model"].named_parameters():
        slope_or_offset = name.endswith((".w", ".b"))
        assert bool(p.grad.abs().sum() > 0) != slope_or_offset, name
    assert tuple(scope["images"].shape) == (3, 1, 8, 8) and scope["images"].isfinite().all()
