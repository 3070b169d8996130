import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agents.cli import app
from agents.qsampling import TABLES, QSamplingAgent
from agents.store import AgentStore
from streams.zarr_reader import ZarrRunReader

runner = CliRunner()
FAST = "target_rel_sigma: 0.05\nfit_starts: 4\n"


def _command_paths(group=None, path=()):
    import typer.main

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from _command_paths(cmd, path + (name,))


@pytest.mark.parametrize("args", [["--help"], *[[*p, "--help"] for p, _ in _command_paths()]])
def test_help_everywhere(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output


def test_every_command_lists_a_one_line_summary():
    """The command lists (``beampilot --help``, ``beampilot demo --help``) show each command's
    summary: one sentence, not a docstring's first lines broken where the source breaks them."""
    for path, cmd in _command_paths():
        text = cmd.short_help or cmd.help or ""
        assert text.strip().endswith(".") and "\n" not in text.strip() and len(text) <= 110, (path, text)


@pytest.mark.parametrize("args", [["demo", "bragg", "--weights", "no-such-weights", "--frames", "1", "--quiet"],
                                  ["demo", "sans-sr", "--weights", "no-such-weights", "--frames", "1", "--quiet"]])
def test_a_mistake_a_user_can_fix_is_one_line_not_a_traceback(tmp_path, args):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error: " in result.output and "no weights 'no-such-weights'" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # not WeightsError


def _with_out():
    return [p for p, cmd in _command_paths() if any(o.name == "out" for o in getattr(cmd, "params", []))]


@pytest.mark.parametrize("path", _with_out())
def test_an_out_that_is_a_file_is_refused_before_the_command_runs(tmp_path, path):
    a_file = tmp_path / "report.json"
    a_file.write_text("{}")
    args = [*path, "--out", str(a_file)] + (["denoise"] if path == ("train",) else [])
    result = runner.invoke(app, args)
    said = " ".join(result.output.replace("│", " ").split())  # as read, not as rich wraps it in its box
    assert result.exit_code == 2 and "Invalid value for '--out'" in said and "is a file: name a directory" in said, said
    assert "Traceback" not in result.output and a_file.read_text() == "{}"


@pytest.mark.parametrize("path", _with_out())
def test_a_command_refused_for_another_option_leaves_no_out_behind(tmp_path, monkeypatch, path):
    """``--out`` is checked when the command line is read, but made only when the command runs:
    neither the named directory nor the default one (in the working directory) is left behind."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "report"
    task = ["denoise"] if path == ("train",) else []
    for args in ([*path, *task, "--out", str(out), "--seed", "not-a-number"], [*path, *task, "--seed", "x"]):
        result = runner.invoke(app, args)
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "Invalid value for '--seed'" in said, said
    assert sorted(tmp_path.iterdir()) == [], sorted(tmp_path.iterdir())


@pytest.mark.parametrize("path", _with_out())
def test_an_out_below_a_file_is_refused_before_the_command_runs(tmp_path, path):
    a_file = tmp_path / "report.json"
    a_file.write_text("{}")
    args = [*path, "--out", str(a_file / "below")] + (["denoise"] if path == ("train",) else [])
    result = runner.invoke(app, args)
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "Invalid value for '--out'" in said and "is a file" in said, said
    assert a_file.read_text() == "{}"


def test_the_commands_with_an_out_are_the_demos_and_train():
    assert sorted(_with_out()) == sorted([("train",), *[("demo", d) for d in
                                          ("sas-qscan", "mapping", "tune", "ring", "bragg", "sans-sr")]])


def test_sans_sr_weights_of_another_factor_are_named_before_the_run(tmp_path):
    result = runner.invoke(app, ["demo", "sans-sr", "--weights", "sans-sr-x2", "--factor", "4", "--frames", "1",
                                 "--quiet", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "sans-sr-x2 are a 2x network and the demo asks for 4x" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o" / "summary.json").exists()


def test_a_bad_demo_config_is_named_and_leaves_no_store_behind(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["demo", "sas-qscan", "--config", str(bad), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "the demo's agent settings" in result.output and "unknown key 'colour'" in result.output
    assert not (out / "store.zarr").exists()  # so the same --out works once the config is fixed


def test_a_demo_config_that_is_not_yaml_is_named_by_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_rel_sigma: [0.05\n")
    result = runner.invoke(app, ["demo", "sas-qscan", "--config", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "is not valid YAML: line 2, column 1" in said, said
    assert "Traceback" not in result.output


def test_replay_into_agents_goes_on_past_an_agent_that_fails_as_the_daemon_does(tmp_path):
    import yaml

    from agents.demo_tune import run_tune_demo

    run_tune_demo(tmp_path / "tune", seed=3, budget=4, progress=False,
                  overrides={"acq_restarts": 2, "acq_raw_samples": 48, "mc_samples": 32})
    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "agent.example.yaml").read_text())
    config["state_dir"] = str(tmp_path / "state")
    (tmp_path / "agents.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["replay", str(tmp_path / "tune" / "store.zarr"), "--fast", "--quiet",
                                 "--agents", str(tmp_path / "agents.yaml")])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout[result.stdout.index("{"):])
    # the Q-scan agent cannot read the optics run's descriptor: named, counted, and the replay went on
    failed = stats["target"]["agent_errors"]["qsampling"]
    assert failed["count"] >= 1 and "sas_flux" in failed["first"][0]
    assert stats["counts"]["event"] == 4 and "agent qsampling failed on descriptor" in result.stderr


def test_demo_tune_says_what_it_found_against_the_true_optimum(tmp_path):
    out = tmp_path / "tune"
    result = runner.invoke(app, ["demo", "tune", "--out", str(out), "--budget", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    final, lines = summary["final"], result.stdout.splitlines()
    assert lines[0] == "stopped: budget spent: 4 evaluations of a budget of 4"
    pct = f"{100 * final['fraction_of_optimum']:.1f}% of the optimum"
    verdict = "meets" if final["meets_requirement"] else "MISSES"
    assert pct in lines[1] and f"({verdict} <= 12 µm)" in lines[1], lines[1]
    for axis, value in final["settings"].items():
        assert any(line.split() == [axis, "=", f"{value:.4g}", "(optimum", f"{summary['true_optimum']['settings'][axis]:.4g})"]
                   for line in lines), (axis, lines)
    assert "  not within 5% of the optimum in 4 evaluations" in lines
    assert any(line.startswith("  evaluations: 4 (") and "4 admitted, 0 rejected" in line for line in lines), lines


def test_demo_writes_the_report(tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text(FAST)
    out = tmp_path / "out"
    result = runner.invoke(app, ["demo", "sas-qscan", "--out", str(out), "--quiet", "--config", str(config),
                                 "--seed", "1000"])
    assert result.exit_code == 0, result.output
    assert "stopped: target precision reached" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fit"]["relative_sigma"]["radius"] <= 0.05
    assert summary["n_measurements"] > 12 and summary["beam_time"]["exposure_s"] > 0
    assert set(summary["figures"]) == {"iq.png", "sampling.png", "convergence.png"}
    for name in summary["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run into the same directory refuses, and says how to continue instead
    again = runner.invoke(app, ["demo", "sas-qscan", "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_bad_settings_and_stores_get_clear_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("target_precision: 0.05\n")
    result = runner.invoke(app, ["demo", "sas-qscan", "--out", str(tmp_path / "o"), "--config", str(config)])
    assert result.exit_code == 2 and "unknown key 'target_precision'" in result.output
    result = runner.invoke(app, ["demo", "sas-qscan", "--resume", str(tmp_path / "nowhere.zarr")])
    assert result.exit_code == 2 and "no store at" in result.output


def _observed_keys(store: Path) -> list[str]:
    try:
        return list(AgentStore(store, "QSamplingAgent", TABLES, read_only=True).read("observations")["point_key"])
    except Exception:  # not created yet, or created a moment ago
        return []


@pytest.mark.slow
def test_sigkill_then_resume_loses_and_repeats_nothing(tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text("target_rel_sigma: 0.02\n")
    out = tmp_path / "out"
    store = out / "store.zarr"
    cmd = [sys.executable, "-m", "agents.cli", "demo", "sas-qscan", "--out", str(out), "--quiet",
           "--config", str(config), "--seed", "1001", "--speed", "20"]
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while len(_observed_keys(store)) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the demo ended before it could be killed: {errors.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _observed_keys(store)
    assert len(before) >= 20
    resume = subprocess.run([sys.executable, "-m", "agents.cli", "demo", "sas-qscan", "--resume", str(store), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert "stopped: target precision reached" in resume.stdout
    agent = QSamplingAgent.resume(store)
    keys = list(agent.store.read("observations")["point_key"])
    assert keys[: len(before)] == before, "a measurement made before the kill was lost"
    decided = list(agent.store.read("decisions")["point_key"])
    assert len(keys) == len(set(keys)), "a measurement was repeated"
    assert set(decided) == set(keys), "a decided point was lost (never measured)"
    # the raw runs: two (killed, resumed); every measured point is in them exactly once
    reader = ZarrRunReader(store)
    raw = [uid for uid in reader.runs() if "raw_run_uid" not in reader.start(uid)]
    assert len(raw) == 2 and reader.stop(raw[0]) is None and reader.stop(raw[1])["exit_status"] == "success"
    raw_keys = [k for uid in raw for k in reader.table(uid)["beampilot_point_key"]]
    assert sorted(raw_keys) == sorted(keys)
    derived = [uid for uid in reader.runs() if "raw_run_uid" in reader.start(uid)]
    assert {reader.start(uid)["raw_run_uid"] for uid in derived} <= set(raw)


def _disk_full(*args, **kwargs):
    # as zarr raised it on a full tmpfs (no file name), wrapped the way bluesky's run does
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as err:
        raise RuntimeError("Run aborted") from err


def test_a_full_disk_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch):
    """Found with the demo writing to a 400 kB tmpfs: a two-screen traceback. Now one line naming
    the store and the resume command (which, with space freed, finished the run)."""
    import agents.demo_detector
    import agents.demo_sas

    monkeypatch.setattr(agents.demo_sas, "run_demo", _disk_full)
    result = runner.invoke(app, ["demo", "sas-qscan", "--quiet", "--out", str(tmp_path / "out")])
    store = tmp_path / "out" / "store.zarr"
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"error: No space left on device writing {store}. Everything stored before it is in {store}; free "
            f"space there, then continue with: beampilot demo sas-qscan --resume {store}") in result.output
    # any other command: the same line without a resume
    monkeypatch.setattr(agents.demo_detector, "run_detector_demo", _disk_full)
    result = runner.invoke(app, ["demo", "bragg", "--quiet", "--frames", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: No space left on device: free space there, or write somewhere else (--out)" in result.output


def test_run_check_says_what_would_fail_and_exits_1_having_started_nothing(tmp_path):
    """``beampilot run --check`` with nothing listening: each server named with what to do, a
    status port another program holds, and an agent whose first plan its own gate refuses
    (the stage limits narrower than its extent). Exit 1; state_dir is not made."""
    import socket

    import yaml

    from streams.qserver_launch import free_port

    raw = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "agents.example.yaml").read_text())
    dead = free_port()
    raw["kafka"]["bootstrap_servers"] = f"127.0.0.1:{dead}"
    raw["queueserver"]["zmq_control_addr"] = f"tcp://127.0.0.1:{free_port()}"
    raw["state_dir"] = str(tmp_path / "state")
    mapping = next(a for a in raw["agents"] if a["kind"] == "mapping")
    mapping["safety"]["limits"]["stage_x"]["high"] = 2.0
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        raw["http"] = {"port": held.getsockname()[1]}
        path = tmp_path / "daemon.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = CliRunner().invoke(app, ["run", "--config", str(path), "--check"])
    lines = {line.split(":")[0]: line for line in result.output.splitlines()}
    assert result.exit_code == 1, result.output
    assert lines["FAIL broker"].endswith(f"cannot reach Kafka at 127.0.0.1:{dead} (connection refused); start the "
                                         "broker or fix kafka.bootstrap_servers")
    assert "did not answer" in lines["FAIL queue server"]
    assert "another daemon (or program) has it?" in lines["FAIL status port"]
    assert "refused by its own safety gate" in lines["FAIL agent film-map"] and "stage_x" in lines["FAIL agent film-map"]
    assert lines["ok   agent denoise"].startswith("ok   agent denoise: detector: weights denoise")
    assert lines["ok   agent focus"] and "4 failed, 0 warning(s)" in result.output
    assert not (tmp_path / "state").exists()


def test_a_librarys_repeated_log_lines_are_let_through_once_a_minute_with_a_count():
    """A broker that is down makes kafka-python log each reconnect; the daemon's log keeps one a
    minute of each (numbers aside), saying how many were held back. beampilot's own lines all pass."""
    import logging

    from agents.cli import RepeatsQuieted

    now = [0.0]
    quiet = RepeatsQuieted(clock=lambda: now[0])
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Keep()
    handler.addFilter(quiet)
    kafka, ours = logging.getLogger("kafka.net.test_quiet"), logging.getLogger("agents.test_quiet")
    for log in (kafka, ours):
        log.addHandler(handler)
        log.propagate = False
    try:
        for i in range(100):  # ten a second for 10 s, on two ports
            now[0] = i / 10
            kafka.error("Connection failed: 111 ECONNREFUSED to port %d", 9000 + i % 2)
            ours.warning("broker unreachable (%d)", i)
        now[0] = 60.5
        kafka.error("Connection failed: 111 ECONNREFUSED to port %d", 9000)
        kafka.error("Fetch to node 111 failed")
    finally:
        for log in (kafka, ours):
            log.removeHandler(handler)
            log.propagate = True
    theirs = [m for m in kept if "ECONNREFUSED" in m or "Fetch" in m]
    assert theirs == ["Connection failed: 111 ECONNREFUSED to port 9000",
                      "Connection failed: 111 ECONNREFUSED to port 9000 (99 more like it in the last 60 s)",
                      "Fetch to node 111 failed"]
    assert len([m for m in kept if m.startswith("broker unreachable")]) == 100
