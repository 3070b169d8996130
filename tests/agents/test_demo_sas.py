from agents.demo_sas import DemoSetup, _catch_up, agent_settings, closed_loop
from agents.qsampling import QSamplingAgent
from simulators.sas import SimClock
from streams.zarr_writer import ZarrRunWriter


class DeafToLastEvent:
    """Passes documents on, except one event: as if killed between the run writer and the agent."""

    def __init__(self, agent, deaf_at):
        self.agent, self.name, self.deaf_at, self.seen = agent, agent.name, deaf_at, 0

    @property
    def n_observations(self):
        return self.agent.n_observations

    def tell(self, name, doc):
        if name == "event":
            self.seen += 1
            if self.seen == self.deaf_at:
                return
        self.agent.tell(name, doc)

    def ask(self, n):
        return self.agent.ask(n)

    def report(self):
        return self.agent.report()


def test_resume_recovers_events_the_agent_never_heard_of(tmp_path):
    setup = DemoSetup.draw("polydisperse_sphere", 1000)
    store = tmp_path / "store.zarr"
    writer = ZarrRunWriter(store)
    agent = QSamplingAgent(agent_settings(setup, {"target_rel_sigma": 0.05}), store)
    closed_loop(setup, DeafToLastEvent(agent, deaf_at=14), clock=SimClock(), batch_size=4,
                subscribers=(writer,), md={}, max_rounds=4)
    writer.close()
    missed = agent.pending()
    assert len(missed) == 1  # the event it did not hear left its point pending
    again = QSamplingAgent.resume(store)
    _catch_up(again, store)
    assert again.n_observations == agent.n_observations + 1
    assert again.pending() == []
    assert again.report()["duplicates_ignored"] == agent.n_observations  # the rest were known
