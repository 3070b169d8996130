"""Tests of agents.ring_optimize and the ring demo: Dask evaluation (a worker killed
mid-generation), failed evaluations as outcomes, resuming from the zarr store."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from agents.demo_ring import dask_client
from agents.errors import AgentStoreError
from agents.ring_optimize import (
    DaskEvaluator,
    OptimizationStore,
    RingProblem,
    SerialEvaluator,
    evaluate_knobs,
    make_optimizer,
    optimize,
)
from models.mobo import MOBOConfig
from simulators.ring import TrackingConfig

TINY = dataclasses.replace(TrackingConfig.cheap(), n_turns=8, n_angles=3, n_amplitudes=4, n_delta=4)


def _knobs(n, seed=0):
    problem = RingProblem()
    return np.random.default_rng(seed).uniform(problem.lower, problem.upper, size=(n, 5))


def test_a_failed_evaluation_is_an_infeasible_outcome_not_a_crash():
    bad = evaluate_knobs(TINY, [0.0, 0.0, 0.0, float("nan"), 1.0])
    assert bad.status == "failed" and bad.g > 0 and bad.F == (0.0, 0.0) and "finite" in bad.reason
    good = evaluate_knobs(TINY, [0.0, 0.0, 0.0, 1.0, 1.0])
    assert good.status == "ok" and good.g < 0 and good.F[0] < 0 and good.F[1] < 0


def test_a_worker_killed_mid_generation_costs_nothing():
    slow = dataclasses.replace(TrackingConfig.cheap(), n_turns=160)  # ~0.3 s a setting
    X = _knobs(12, seed=1)
    expected = SerialEvaluator(slow)(X[:3])
    with dask_client(None, n_workers=2) as client:
        evaluate = DaskEvaluator(client, slow)
        pids = list(client.run(os.getpid).values())
        result: dict = {}
        worker = threading.Thread(target=lambda: result.setdefault("out", evaluate(X)))
        worker.start()
        time.sleep(1.0)  # the generation is under way
        os.kill(pids[0], signal.SIGKILL)
        worker.join(120)
        assert not worker.is_alive()
    outcomes = result["out"]
    assert len(outcomes) == 12 and evaluate.failed == 0
    assert all(o.status != "failed" for o in outcomes)
    assert outcomes[:3] == expected  # the same numbers as in-process: a retried task is the same task


@pytest.mark.parametrize("kind", ["ml_moga", "mobo"])
def test_an_interrupted_optimization_resumes_at_the_last_generation(tmp_path, kind):
    problem = RingProblem(tracking=TINY)
    evaluate = SerialEvaluator(TINY)
    pop = 8
    # MOBO's acquisition optimised with little effort: resuming is what is tested, not its choices
    mobo = MOBOConfig(n_initial=pop, q=2, num_restarts=1, raw_samples=32, mc_samples=16, maxiter=25)

    def make(seed=4):
        return make_optimizer(kind, problem, seed=seed, pop_size=pop, mobo=mobo)

    # uninterrupted: four generations (MOBO: the 8-point design, then batches of 2)
    _whole, hist_whole = optimize(make(), evaluate, problem, max_evaluations=32 if kind == "ml_moga" else 14)
    # interrupted after two, then resumed from the store by a fresh optimizer
    store = OptimizationStore(tmp_path / "run.zarr")
    optimize(make(), evaluate, problem, max_evaluations=16 if kind == "ml_moga" else 10, store=store)
    calls = []

    def counting(X):
        calls.append(len(X))
        return evaluate(X)

    _resumed, hist = optimize(make(), counting, problem, max_evaluations=32 if kind == "ml_moga" else 14,
                             store=OptimizationStore(tmp_path / "run.zarr", create=False))
    assert sum(calls) == (16 if kind == "ml_moga" else 4)  # nothing evaluated twice
    assert hist.evaluations == hist_whole.evaluations
    np.testing.assert_allclose(hist.hypervolume, hist_whole.hypervolume)
    ev = OptimizationStore(tmp_path / "run.zarr", create=False).evaluations()
    assert len(ev["status"]) == (32 if kind == "ml_moga" else 14)
    # a store of another run is refused, with what to do
    with pytest.raises(AgentStoreError, match="same settings"):
        optimize(make(seed=5), evaluate, problem, max_evaluations=40,
                 store=OptimizationStore(tmp_path / "run.zarr", create=False))


def test_ring_demo_writes_its_report(tmp_path):
    from agents.demo_ring import run_ring_demo

    summary = run_ring_demo(tmp_path, generations=2, pop_size=8, mobo_evaluations=11, seed=1, progress=False,
                            aperture_tracking=TINY)
    for name in ("fronts.png", "hypervolume.png", "aperture.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["final_hypervolume"]) == {"ml_moga", "nsga2", "mobo"}
    assert saved["hypervolume"]["ml_moga"]["evaluations"] == [8, 16]
    # MOBO's budget is a cap: 8 + 2 + the last batch cut to 1 (a generation's whole 2 would make 12)
    assert saved["hypervolume"]["mobo"]["evaluations"] == [8, 10, 11]
    assert summary["chosen"]["status"] == "ok" and summary["failed_evaluations"] == 0
    # run again on the same OUT: every optimizer resumes from its store, nothing is tracked twice
    again = run_ring_demo(tmp_path, generations=2, pop_size=8, mobo_evaluations=11, seed=1, progress=False,
                          aperture_tracking=TINY)
    assert again["final_hypervolume"] == summary["final_hypervolume"]
    assert len(OptimizationStore(tmp_path / "ml_moga.zarr", create=False).evaluations()["status"]) == 16


def test_an_external_scheduler_is_used_by_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with dask_client(cluster.scheduler_address) as client:
            outcomes = DaskEvaluator(client, TINY)(_knobs(3))
            assert client.scheduler.address == cluster.scheduler_address
    assert outcomes == SerialEvaluator(TINY)(_knobs(3))


def test_a_scheduler_that_does_not_answer_is_named():
    from agents.errors import AgentError

    with (pytest.raises(AgentError, match=r"cannot reach the Dask scheduler at '127.0.0.1:1'.*leave --dask out"),
          dask_client("127.0.0.1:1", connect_timeout=1.0)):
        pass
    with (pytest.raises(AgentError, match=r"'notanaddress' is not a Dask scheduler address .*give host:port"),
          dask_client("notanaddress")):
        pass
    # neither refused client became dask's default: one did, and later dask computations in the
    # process (tiled's DataFrameClient.read, in the tests that ran after it) waited on it for ever
    from distributed.client import _get_global_client

    assert _get_global_client() is None


def test_the_demo_leaves_dask_s_default_scheduler_alone():
    import dask
    from distributed.client import _get_global_client

    with dask_client(None, n_workers=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert _get_global_client() is None and dask.config.get("scheduler", None) is None


def test_cli_ring_demo_help_and_bad_input():
    from agents.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["demo", "ring", "--help"])
    assert result.exit_code == 0 and "--dask" in result.output
    result = runner.invoke(app, ["demo", "ring", "--pop-size", "7"])
    assert result.exit_code != 0 and "even" in result.output
