"""notebooks/tour.ipynb runs top to bottom in smoke mode, and is committed without outputs."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert code[0].source.startswith("SMOKE = True")


def test_notebook_runs_in_smoke_mode(tmp_path):
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    # the evaluation table was printed, one row per model, and fine-tuning kept the zeros
    for name in ("baseline", "pruned", "reduced", "shallow", "reduced-int8"):
        assert f"\n{name} " in text or text.startswith(name + " "), name
    assert "sparsity after fine-tuning: 0.3" in text
    assert (tmp_path / "runs" / "tour" / "pruned" / "model.safetensors").is_file()


def test_notebook_computes_in_the_precision_auto_picks():
    """A hard-coded bf16 would run ~100x slower on a CPU that only emulates it."""
    nb = nbformat.read(NB, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'resolve_precision("auto"' in code
    assert '"bf16"' not in code and "'bf16'" not in code and "bfloat16" not in code
