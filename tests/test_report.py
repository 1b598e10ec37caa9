"""`cirbench report` in a real headless browser (Chromium from Debian's packages through Selenium), plots, and
`cirbench data check` (which must not import torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cirbench.cli import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
IN_CI = bool(os.environ.get("CI"))


def browser():
    """A headless Chromium driven by Selenium; in CI a missing browser is a failure, elsewhere a skip."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("selenium is not installed")
    if not (CHROMIUM and CHROMEDRIVER):
        if IN_CI:
            pytest.fail("CI needs Chromium and its driver (apt-get install chromium chromium-driver)")
        pytest.skip("Chromium or chromedriver not found")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """slerp at three alphas and the image-only baseline on the embedded shapes benchmark."""
    out = tmp_path_factory.mktemp("runs")
    env = {"CIRBENCH_CACHE": str(out / "cache")}
    runner = CliRunner(env=env)
    res = runner.invoke(cli, ["run", "-o", str(out / "results"), "-q", "--no-leaderboard", "--bootstrap", "200",
                              "--alpha", "0.5,0.7,0.9"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["run", "-m", "image-only", "-o", str(out / "results"), "-q", "--no-leaderboard",
                              "--bootstrap", "200"])
    assert res.exit_code == 0, res.output
    folder = out / "results" / "shapes" / "val"
    return next(folder.glob("slerp@alpha=0.7__*.json")), next(folder.glob("image-only__*.json")), env


def test_report_in_a_headless_browser(two_runs, tmp_path):
    slerp, image_only, env = two_runs
    # the runs named no data root (their record holds the working folder): the report must not generate shapes
    # there, but read them where the runs did (the cache)
    run_folder = Path(json.loads(slerp.read_text())["dataset"]["data_root"])
    had_val = (run_folder / "val").exists()
    res = CliRunner(env=env).invoke(cli, ["report", str(slerp), str(image_only), "-o", str(tmp_path / "rep"),
                                          "--limit", "0", "--top", "5"])
    assert res.exit_code == 0, res.output
    page = tmp_path / "rep" / "report.html"
    assert (run_folder / "val").exists() == had_val
    text = page.read_text()
    assert "<script src=" not in text and "http" not in text.split("<h2>Provenance")[0]  # self-contained
    assert "<td>plugin code</td><td>method built-in · dataset built-in</td>" in text
    assert {p.name for p in (tmp_path / "rep" / "plots").iterdir()} >= {"leaderboard.png", "leaderboard.svg",
                                                                       "sweep-slerp-alpha.png"}
    rows = [json.loads(line) for line in slerp.with_suffix(".predictions.jsonl").read_text().splitlines()]
    hits = sum(1 for r in rows if set(r["targets"]) & set(r["top"][:5]))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser()
    try:
        driver.get(page.as_uri())
        assert "slerp@alpha=0.7 vs image-only" in driver.title
        queries = driver.find_elements(By.CSS_SELECTOR, ".q")
        assert len(queries) == 400
        # the thumbnails load (natural width > 0), targets are framed
        from selenium.webdriver.support.ui import WebDriverWait

        first_images = queries[0].find_elements(By.TAG_NAME, "img")[:6]
        assert len(first_images) == 6
        driver.execute_script("arguments[0].scrollIntoView()", queries[0])  # thumbnails load lazily
        WebDriverWait(driver, 20).until(lambda d: all(d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", im) for im in first_images))
        assert queries[0].find_elements(By.CSS_SELECTOR, "figure.tgt img")

        def visible():
            return sum(1 for q in driver.find_elements(By.CSS_SELECTOR, ".q") if q.is_displayed())

        show = Select(driver.find_element(By.ID, "show"))
        show.select_by_value("hits")
        assert visible() == hits
        assert driver.find_element(By.ID, "count").text == f"{hits} of 400 queries"
        show.select_by_value("misses")
        assert visible() == 400 - hits
        show.select_by_value("a-only")
        a_only = visible()
        show.select_by_value("b-only")
        assert a_only > visible()  # slerp beats the image-only baseline on shapes
        show.select_by_value("all")
        assert visible() == 400
        # the disagreeing queries come first: the first shown query has different ranks in the two runs
        ranks = queries[0].find_element(By.CSS_SELECTOR, ".meta").text
        assert ranks.count("target rank") == 2
    finally:
        driver.quit()


def test_single_run_report_without_images_and_with_a_bad_pair(two_runs, tmp_path):
    slerp, _, env = two_runs
    res = CliRunner(env=env).invoke(cli, ["report", str(slerp), "-o", str(tmp_path / "one"), "--no-thumbnails"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "one" / "report.html").read_text()
    assert "thumbnails switched off" in text and not (tmp_path / "one" / "thumbs").exists()
    other = tmp_path / "other.json"
    record = json.loads(slerp.read_text())
    record["dataset"]["split"] = "test"
    other.write_text(json.dumps(record))
    res = CliRunner(env=env).invoke(cli, ["report", str(slerp), str(other)])
    assert res.exit_code == 2 and "same split" in res.output
    # an output path that cannot be a folder is the user's file-system error, not an internal one
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = CliRunner(env=env).invoke(cli, ["report", str(slerp), "-o", str(blocker / "rep"), "--no-thumbnails"])
    assert res.exit_code == 2 and res.output.strip() == f"error: {blocker / 'rep'}: Not a directory", res.output
    # a result file copied away from its predictions names the file it looked for
    alone = tmp_path / "alone" / slerp.name
    alone.parent.mkdir()
    alone.write_bytes(slerp.read_bytes())
    res = CliRunner(env=env).invoke(cli, ["report", str(alone), "-o", str(tmp_path / "r"), "--no-thumbnails"])
    wanted = json.loads(slerp.read_text())["predictions"]["file"]
    assert res.exit_code == 2 and f"unreadable: {alone.parent / wanted}: No such file" in res.output, res.output


def test_loss_plot_from_a_training_log(tmp_path):
    from cirbench.plots import loss_plot

    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 2.0 / (s + 1)}) for s in range(20)) + "\n{torn")
    png = loss_plot(log, tmp_path / "loss")
    assert png is not None and png.stat().st_size > 1000 and (tmp_path / "loss.svg").is_file()
    log.write_text("")
    assert loss_plot(log, tmp_path / "none") is None


def test_loss_plot_shows_each_validated_benchmarks_main_metric(tmp_path):
    """The validation entries the training loop writes ({benchmark: {run: metrics}}) give one curve per benchmark,
    of its main metric (CIRR: R@1, FashionIQ: the mean R@10), beside the loss."""
    from cirbench.plots import loss_plot, read_validation

    log = tmp_path / "train_log.jsonl"
    entries = [{"step": s, "loss": 2.0 / s} for s in range(1, 7)]
    for step, r1 in ((3, 20.0), (6, 25.0)):
        entries.append({"step": step, "epoch": 0, "validation": {
            "cirr:val": {f"pic2word@step{step}": {"R@5": 50.0, "R@1": r1}},
            "fashioniq:val": {f"pic2word@step{step}": {"dress/R@10": 9.0, "avg/R@10": r1 / 2, "avg/R@50": 30.0}}}})
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert read_validation(log) == {"cirr:val R@1": [(3, 20.0), (6, 25.0)],
                                    "fashioniq:val avg/R@10": [(3, 10.0), (6, 12.5)]}
    png = loss_plot(log, tmp_path / "loss")
    assert png is not None and png.stat().st_size > 1000


def test_data_check_answers_without_torch(tmp_path):
    from annotations import ANNOTATIONS, copy_tree, write_placeholder

    if not (ANNOTATIONS / "cirr").is_dir():
        pytest.skip("official annotation files not found")
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "CIRR")
    names = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
    for i, rel in enumerate(list(names.values())[:-3]):
        write_placeholder(root / rel, i)
    (root / "captions" / "cap.rc2.val.json").write_text((root / "captions" / "cap.rc2.val.json").read_text() + " ")
    code = ("import sys, cirbench.cli as c\n"
            "try:\n"
            "    c.cli(['data', 'check', '-d', 'cirr', '--data-root', sys.argv[1], '--json'], prog_name='cirbench')\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout[: out.stdout.rindex("EXIT")])
    assert out.stdout.strip().endswith("EXIT 1 False"), out.stdout[-300:] + out.stderr[-500:]  # missing: exit 1
    assert report["images"] == {"referenced": 2297, "present": 2294, "missing": 3,
                                "first_missing": report["images"]["first_missing"]}
    assert len(report["images"]["first_missing"]) == 3
    status = {Path(a["file"]).name: a["status"] for a in report["annotations"]}
    assert status == {"split.rc2.val.json": "official", "cap.rc2.val.json": "differs from the official file"}
    assert report["sample"]["modes"] == {"RGB": 200} and report["sample"]["width"]["max"] == 12


def test_query_rows_put_the_queries_two_runs_disagree_on_first():
    """Per query, each run's rank of its first target in the saved list; queries one run did not answer are left
    out; with two runs the largest rank difference comes first, a target missing from a list counting as one past
    its end; ``top`` cuts each shown list and ``limit`` the queries."""
    from cirbench.report import query_rows

    def row(query, top, targets=("t",)):
        return {"set": "val", "query": query, "reference": "r" + query, "top": list(top), "targets": list(targets)}

    a = [row("1", "tabcd"), row("2", "abtcd"), row("3", "abcdt"), row("4", "tabcd")]
    b = [row("1", "abcdx"), row("2", "abtcd"), row("3", "tabcd")]  # query 4: not answered by b
    out = query_rows([({}, a), ({}, b)], {}, top=3, limit=0)
    assert [e["query"] for e in out] == ["1", "3", "2"]
    assert [[r["rank"] for r in e["runs"]] for e in out] == [[1, None], [5, 1], [3, 3]]
    assert [e["disagreement"] for e in out] == [5, 4, 0]  # b's 5 ids without the target: rank 6
    assert out[0]["runs"][0]["top"] == ["t", "a", "b"] and out[0]["reference"] == "r1"
    assert [e["query"] for e in query_rows([({}, a), ({}, b)], {}, top=3, limit=2)] == ["1", "3"]
    assert [e["query"] for e in query_rows([({}, a)], {}, top=10, limit=0)] == ["1", "2", "3", "4"]  # one run: as is


def test_a_thumbnail_is_made_again_when_its_image_changes(tmp_path):
    """Thumbnails are named by the file's path, size and modification time: an image rewritten in place with the
    same size gets a new thumbnail, an unchanged one is reused, an unreadable one is counted, not raised."""
    from PIL import Image

    from cirbench.report import Thumbnails
    from cirbench.types import ImageRef

    path = tmp_path / "a.bmp"  # an uncompressed format: the same size whatever the pixels
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    thumbs = Thumbnails(tmp_path / "thumbs", {"a": ImageRef("a", path), "bad": ImageRef("bad", tmp_path / "bad.png")})
    (tmp_path / "thumbs").mkdir()
    first = thumbs("a")
    assert thumbs("a") == first and (thumbs.made, thumbs.reused) == (1, 1)
    size = path.stat().st_size
    Image.new("RGB", (40, 30), (0, 0, 255)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == size
    second = thumbs("a")
    assert second != first and thumbs.made == 2
    assert thumbs("bad") is None and thumbs("unknown") is None and thumbs.failed == 1


def test_a_run_of_trained_weights_plots_their_training_loss(two_runs, tmp_path):
    """A run whose --checkpoint names the training output (its folder or the model.safetensors in it) gets the
    loss curve of the log kept beside the weights; one of weights without a log gets none."""
    from cirbench.report import make_plots

    slerp, _, _ = two_runs
    record = json.loads(slerp.read_text())
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "model.safetensors").write_bytes(b"weights")
    (trained / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n"
                                                     for s in range(10)))
    for checkpoint in (trained, trained / "model.safetensors"):
        record["method"]["options"] = {**record["method"]["options"], "checkpoint": str(checkpoint)}
        made = make_plots([slerp], [record], tmp_path / f"out-{checkpoint.name}")
        loss = [(title, png) for title, png in made if title.startswith("Training loss of")]
        assert len(loss) == 1 and (tmp_path / f"out-{checkpoint.name}" / loss[0][1]).is_file(), made
    (trained / "train_log.jsonl").unlink()
    made = make_plots([slerp], [record], tmp_path / "out-none")
    assert not [title for title, _ in made if title.startswith("Training loss of")]


def test_data_check_lists_missing_and_unreadable_images_and_unknown_checksums(tmp_path):
    """The text report names the missing images and the headers it could not read (exit 1), and says of a
    dataset without official checksums that none is known."""
    from cirbench.testing import ToyDatasetPlugin, registered, write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy")
    (root / "images" / "img_red_0.png").unlink()
    (root / "images" / "img_green_1.png").write_bytes(b"not a png")
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["data", "check", "-d", "toy", "--data-root", str(root)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert any(line.startswith("  annotation  queries.json: no official checksum known (sha256 ")
               for line in lines), res.output
    assert "  images      11 of 12 present, 1 missing" in lines
    assert f"    missing   {root / 'images' / 'img_red_0.png'}" in lines
    unreadable = [line for line in lines if line.startswith("    unreadable ")]
    assert len(unreadable) == 1 and unreadable[0].startswith(
        f"    unreadable {root / 'images' / 'img_green_1.png'}: UnidentifiedImageError"), res.output
    assert "  sample      11 headers: PNG 10; modes RGB 10" in lines, res.output


def test_recorded_dataset_options_are_checked_before_the_dataset_is_built(two_runs, tmp_path):
    """The report rebuilds the run's dataset from the options its result recorded: an edited option of the wrong
    type is said in the page ("images unavailable") instead of stopping on 'internal error: TypeError'; an option
    the plugin no longer declares is left out."""
    import shutil

    slerp, _, env = two_runs
    edited = tmp_path / "edited" / slerp.name
    edited.parent.mkdir()
    shutil.copy(slerp.with_name(json.loads(slerp.read_text())["predictions"]["file"]), edited.parent)
    record = json.loads(slerp.read_text())
    record["dataset"]["options"]["queries"] = {"many": True}
    edited.write_text(json.dumps(record))
    res = CliRunner(env=env).invoke(cli, ["report", str(edited), "-o", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "r1" / "report.html").read_text()
    assert "images unavailable (option --queries: {&#x27;many&#x27;: True} is not a finite int)" in text, text[:3000]
    record["dataset"]["options"]["queries"] = True  # a bool is no int either
    edited.write_text(json.dumps(record))
    res = CliRunner(env=env).invoke(cli, ["report", str(edited), "-o", str(tmp_path / "r2")])
    assert res.exit_code == 0 and "is not a finite int" in (tmp_path / "r2" / "report.html").read_text()
    del record["dataset"]["options"]["queries"]
    record["dataset"]["options"]["renamed_since"] = 3
    edited.write_text(json.dumps(record))
    res = CliRunner(env=env).invoke(cli, ["report", str(edited), "-o", str(tmp_path / "r3")])
    assert res.exit_code == 0 and "images unavailable" not in (tmp_path / "r3" / "report.html").read_text()
