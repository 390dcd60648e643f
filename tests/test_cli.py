"""The command line: the demo runs end to end, and bad input exits 2 with one clear line."""

from typer.testing import CliRunner

from rankscope.cli import app

runner = CliRunner()


def test_demo_runs_and_finds_the_planted_spikes_but_no_untrained_structure():
    result = runner.invoke(app, ["demo", "--layers", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "naive MP" in result.output and "Planted spikes" in result.output
    assert "found 2 outliers" in result.output  # θ = 2.0 and 1.4 are above the BBP threshold, 0.5 is not


def test_bad_option_exits_2_with_a_clear_message():
    result = runner.invoke(app, ["demo", "--layers", "1", "--fpr", "1.5"])
    assert result.exit_code == 2
    assert "--fpr 1.5" in result.output and "fpr in (0, 0.5]" in result.output
