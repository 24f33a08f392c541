"""`ganlab report`: the page is built from the run folder and checked in a real headless browser
(Debian's chromium, driven by Playwright): it loads with no console errors and every image is there."""

import shutil
from pathlib import Path

import pytest
from conftest import script_evaluations

from ganlab import cli, train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_in_browser(page_path: Path) -> dict:
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
            heads = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        finally:
            browser.close()
    return {"errors": errors, "images": imgs, "headings": heads}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_of_a_run_with_a_rollback_loads_in_a_real_browser(tiny_cfg, monkeypatch, tmp_path, capsys):
    script_evaluations(monkeypatch, [5.0, 3.0, 20.0, 25.0, 30.0, 30.0])
    res = train.train(tiny_cfg("train.steps=48", "selection.collapse_evals=2", "selection.max_rollbacks=1"), quiet=True)
    assert cli.main(["report", str(res.run_dir)]) == 0
    page = res.run_dir / "report" / "report.html"
    assert (res.run_dir / "report" / "curves.png").exists() and (res.run_dir / "report" / "metric.png").exists()
    html = page.read_text()
    assert "model.nz" in html and "train.steps" in html  # the config diff from the defaults
    seen = open_in_browser(page)
    assert seen["errors"] == []
    grids = [i for i in seen["images"] if i[0].startswith("step ")]
    assert len(grids) == len(list((res.run_dir / "samples").glob("step_*.png"))) == 6
    assert all(complete and width > 0 for _, complete, width in seen["images"])
    assert any("fid at each evaluation" in h for h in seen["headings"])
    # several runs: one comparison page
    assert cli.main(["report", str(res.run_dir), str(res.run_dir), "--out", str(tmp_path / "cmp")]) == 0
    cmp = open_in_browser(tmp_path / "cmp" / "report.html")
    assert cmp["errors"] == [] and all(c and w > 0 for _, c, w in cmp["images"])


def test_a_multi_run_report_names_each_hand_over_signature_and_warns_when_they_differ(tiny_cfg, monkeypatch, tmp_path):
    """Several runs on one page: each hand-over score beside its signature, and a warning when the
    signatures differ (the scores are then not comparable)."""
    from ganlab import report

    script_evaluations(monkeypatch, [3.0, 2.0, 2.5])
    a = train.train(tiny_cfg(), run_dir=tmp_path / "a", quiet=True)
    script_evaluations(monkeypatch, [3.0, 2.0, 2.5])
    b = train.train(tiny_cfg("eval.num_samples=24"), run_dir=tmp_path / "b", quiet=True)  # another hand-over protocol
    page = report.write_report([a.run_dir, b.run_dir], tmp_path / "both").read_text()
    assert (
        a.handover_signature in page and b.handover_signature in page and a.handover_signature != b.handover_signature
    )
    assert "not comparable" in page
    same = report.write_report([a.run_dir, a.run_dir], tmp_path / "same").read_text()
    assert "not comparable" not in same
