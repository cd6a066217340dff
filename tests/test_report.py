"""The run report: the summary comes first, the time chart follows the stages' seconds."""

from alignx_ray.report import SUMMARY, RunReport, seconds_chart


def test_summary_is_rendered_first_and_survives_a_reload(tmp_path):
    report = RunReport(tmp_path, "run")
    report.add("ingest", {"responses": 10, "stage_seconds": 2.0})
    report.add(SUMMARY, {"markdown": "what ran"})
    text = report.markdown()
    assert text.index("## summary") < text.index("## ingest")
    assert RunReport(tmp_path, "run").markdown() == text  # read back from report.json


def test_seconds_chart_bars_are_proportional():
    chart = seconds_chart({"a": {"stage_seconds": 30.0}, "b": {"seconds": 10}, "c": {"status": "reused"}})
    bars = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in chart.splitlines()[2:]}
    assert set(bars) == {"a", "b"} and len(bars["a"]) == 3 * len(bars["b"])
    assert seconds_chart({"c": {}}) == ""
