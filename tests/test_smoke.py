"""The embedded default on the real SmolLM2-135M-Instruct, shortened, run as README.md's Python API example."""

import contextlib
import io
import json
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The Python block between the api-example markers of README.md, as a user would copy it."""
    block = README.read_text().split("<!-- api-example:start -->")[1].split("<!-- api-example:end -->")[0]
    return re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)


def test_readme_api_example_tunes_the_smoke_preset(tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run goes under runs/ in the working directory
    printed = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md example", "exec"), scope)
    shown = printed.getvalue()
    result = scope["result"]

    # The callback printed the baseline and the final eval, in order; then the verdict and the report path.
    assert re.findall(r"^step (\d+): held-out reward accuracy", shown, flags=re.M) == ["0", "4"]
    assert "step 0: held-out reward accuracy 0.000" in shown
    assert result.summary["verdict"] in shown and (result.output_dir / "report.html").is_file()

    lines = [row for row in result.metrics if row["step"] > 0]
    assert scope["losses"] == [row["loss"] for row in lines]
    # Step 1 starts at policy == reference: every reward 0, so DPO's term is ln 2; the preset adds the chosen
    # answers' NLL (RPO), a positive per-token mean.
    assert lines[0]["rewards/chosen"] == 0 and lines[0]["rewards/rejected"] == 0
    assert math.log(2) < lines[0]["loss"] < math.log(2) + 5
    # After a few steps at the preset's learning rate the policy prefers the chosen answers it trains on;
    # the held-out accuracy of the full 16-step run is measured in docs/benchmarks.md.
    assert lines[-1]["rewards/margins"] > 0 and lines[-1]["rewards/accuracies"] > 0.5
    # ... and it carries over to the 48 held-out pairs (unseen entities), evaluated after step 4.
    final = lines[-1]
    assert final["step"] == 4 and "eval_rewards/accuracies" in final
    assert final["eval_rewards/accuracies"] > 0.75
    assert final["eval_rewards/margins"] > 0.3
    baseline = next(row for row in result.metrics if row["step"] == 0)
    assert final["eval_loss"] < baseline["eval_loss"] - 0.1
    # The NLL term keeps the chosen answers likely: their held-out log-prob does not fall (plain DPO's did).
    assert final["eval_logps/chosen"] > baseline["eval_logps/chosen"] - 0.5
    assert "the policy learned the preference" in result.summary["verdict"]
    run_info = json.loads((result.output_dir / "run.json").read_text())
    assert run_info["base_model"]["gguf_file"].endswith(".gguf")
    assert run_info["base_model"]["path"] == str(smollm2_dir)
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()
