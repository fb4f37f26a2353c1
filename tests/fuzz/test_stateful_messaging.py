"""A stateful model of messaging, checked against the real dispatch core.

Hypothesis drives register / login / send / fetch / ack / reconnect / token expiry (the
harness clock jumps past the session TTL) / password change (login then passwd_start and
passwd_finish on the same ConnectionState) in any order, and after every step compares
the server with a simple model:

* a message only ever reaches its recipient (each payload names its recipient);
* each sender's messages reach a recipient in the order sent;
* whatever is not acked is delivered again on the next fetch;
* an acked message is never delivered again;
* sessions die with expiry and with a password change, and nothing else.

The clock moves 1 ms per step: revocation voids sessions issued strictly before the
mark, so a session issued in the very instant of a password change would survive it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qpq_server.protocol.dispatch import ConnectionState
from tests.helpers.dispatch import PASSWORD
from tests.helpers.syncharness import SyncHarness, sync_harness

SCALE = 20 if os.environ.get("QPQ_SOAK") == "1" else 1


@dataclass
class User:
    name: str
    password: bytes = PASSWORD
    sessions: dict[str, bool] = field(default_factory=dict)  # token -> valid per model
    pending: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (sender, seq)
    acked: set[int] = field(default_factory=set)
    last_seq_seen: dict[str, int] = field(default_factory=dict)


class Messaging(RuleBasedStateMachine):
    sh: SyncHarness  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, User] = {}
        self.conns: list[ConnectionState] = []
        self.seq = 0

    def call(self, conn: ConnectionState, op: str, **fields: object) -> dict[str, object]:
        return self.sh.run(self.sh.h.call(conn, op, **fields))

    def tick(self) -> None:
        self.sh.h.clock.now += 0.001

    @initialize()
    def start(self) -> None:
        self.conns = [self.sh.run(self.sh.h.connect()) for _ in range(2)]
        for c in (0, 1):  # two users with a session each: sends can start at once
            self.register(c)
            user = list(self.users.values())[-1]
            self.tick()
            result = self.sh.run(self.sh.h.login(self.conns[c], user.name, user.password))
            assert result["ok"], result
            user.sessions[str(result["session"])] = True

    conns_ix = st.integers(min_value=0, max_value=1)

    @rule(c=conns_ix)
    def register(self, c: int) -> None:
        if len(self.users) >= 4:
            return
        name = self.sh.fresh_name("sm")
        self.sh.run(self.sh.h.register(self.conns[c], name))
        self.users[name] = User(name)

    def pick(self, data: st.DataObject) -> User:
        return self.users[data.draw(st.sampled_from(sorted(self.users)))]

    def live_session(self, user: User) -> str | None:
        valid = [t for t, ok in user.sessions.items() if ok]
        return valid[-1] if valid else None

    @precondition(lambda self: self.users)
    @rule(c=conns_ix, data=st.data())
    def login(self, c: int, data: st.DataObject) -> None:
        self.tick()
        user = self.pick(data)
        result = self.sh.run(self.sh.h.login(self.conns[c], user.name, user.password))
        assert result["ok"], result
        user.sessions[str(result["session"])] = True

    @precondition(lambda self: self.users)
    @rule(data=st.data(), c=conns_ix, count=st.integers(min_value=1, max_value=3))
    def send(self, data: st.DataObject, c: int, count: int) -> None:
        sender = self.pick(data)
        recipient = self.pick(data)
        session = data.draw(st.sampled_from(sorted(sender.sessions) or ["none"]))
        for _ in range(count):
            self.send_one(c, sender, recipient, session)

    def send_one(self, c: int, sender: User, recipient: User, session: str) -> None:
        self.tick()
        self.seq += 1
        payload = msgpack.packb([recipient.name, sender.name, self.seq])
        r = self.call(self.conns[c], "enqueue", session=session, recipients=[recipient.name],
                      payload=payload)
        if sender.sessions.get(session, False):
            assert r["ok"], r
            (msg_id,) = r["ids"]  # type: ignore[misc]
            recipient.pending[int(msg_id)] = (sender.name, self.seq)
        else:
            assert not r["ok"] and r["error"]["code"] == "invalid_session", r  # type: ignore[index]

    @precondition(lambda self: any(self.live_session(u) for u in self.users.values()))
    @rule(data=st.data(), c=conns_ix, ack_some=st.booleans())
    def fetch_and_ack(self, data: st.DataObject, c: int, ack_some: bool) -> None:
        self.tick()
        user = data.draw(st.sampled_from(
            [u for _, u in sorted(self.users.items()) if self.live_session(u)]))
        session = self.live_session(user)
        r = self.call(self.conns[c], "fetch", session=session)
        assert r["ok"], r
        got = r["messages"]
        assert isinstance(got, list)
        ids = [int(m["id"]) for m in got]
        for m in got:
            to, sender, seq = msgpack.unpackb(m["payload"])
            assert to == user.name, f"{user.name} got a message for {to}"
            assert m["from"] == sender
            assert int(m["id"]) not in user.acked, "an acked message came back"
        # Unacked messages come back, all of them (the model keeps mailboxes small).
        assert ids == sorted(user.pending), (ids, sorted(user.pending))
        per_sender: dict[str, list[int]] = {}
        for m in got:
            _, sender, seq = msgpack.unpackb(m["payload"])
            per_sender.setdefault(sender, []).append(seq)
        for seqs in per_sender.values():
            assert seqs == sorted(seqs), "a sender's messages came out of order"
        if not ack_some or not ids:
            return
        chosen = data.draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
        a = self.call(self.conns[c], "ack", session=session, ids=chosen)
        assert a["ok"] and a["deleted"] == len(chosen), a
        for msg_id in chosen:
            user.pending.pop(msg_id)
            user.acked.add(msg_id)
        again = self.call(self.conns[c], "ack", session=session, ids=chosen)
        assert again["ok"] and again["deleted"] == 0, again

    @precondition(lambda self: any(self.live_session(u) for u in self.users.values()))
    @rule(data=st.data(), c=conns_ix)
    def fetch_carrying_acks(self, data: st.DataObject, c: int) -> None:
        """Acks on a fetch: the user's own go before the page is read; ids of anyone
        else's messages (picked on purpose) change nothing."""
        self.tick()
        user = data.draw(st.sampled_from(
            [u for _, u in sorted(self.users.items()) if self.live_session(u)]))
        own = data.draw(st.lists(st.sampled_from(sorted(user.pending) or [0]), unique=True))
        foreign = sorted(i for u in self.users.values() if u is not user for i in u.pending)
        others = data.draw(st.lists(st.sampled_from(foreign or [0]), unique=True))
        own = [i for i in own if i in user.pending]
        others = [i for i in others if i not in user.pending]
        r = self.call(self.conns[c], "fetch", session=self.live_session(user),
                      ack=own + others)
        assert r["ok"] and r["acked"] == len(own), (r, own, others)
        for msg_id in own:
            user.pending.pop(msg_id)
            user.acked.add(msg_id)
        got = r["messages"]
        assert isinstance(got, list)
        assert [int(m["id"]) for m in got] == sorted(user.pending)

    @rule(c=conns_ix)
    def reconnect(self, c: int) -> None:
        self.sh.h.core.service.connection_closed(self.conns[c])
        self.conns[c] = self.sh.run(self.sh.h.connect())

    @rule()
    def sessions_expire(self) -> None:
        self.sh.h.clock.now += self.sh.h.core.service.config.server.session_ttl_s + 1
        for user in self.users.values():
            user.sessions = dict.fromkeys(user.sessions, False)

    @precondition(lambda self: self.users)
    @rule(data=st.data(), c=conns_ix)
    def change_password(self, data: st.DataObject, c: int) -> None:
        self.tick()
        user = self.pick(data)
        conn = self.conns[c]
        login = self.sh.run(self.sh.h.login(conn, user.name, user.password))
        assert login["ok"], login
        self.tick()
        new_password = data.draw(st.binary(min_size=8, max_size=24))
        r = self.sh.run(self.sh.h.passwd(conn, user.name, str(login["session"]),
                                         new_password))
        assert r["ok"], r
        user.password = new_password
        user.sessions = dict.fromkeys(user.sessions, False)
        user.sessions[str(login["session"])] = False
        user.sessions[str(r["session"])] = True

    @precondition(lambda self: self.users)
    @rule(data=st.data(), c=conns_ix)
    def old_sessions_are_refused(self, data: st.DataObject, c: int) -> None:
        user = self.pick(data)
        for token, valid in user.sessions.items():
            r = self.call(self.conns[c], "fetch", session=token, limit=1)
            if valid:
                assert r["ok"], r
            else:
                assert r["error"]["code"] == "invalid_session", r  # type: ignore[index]

    @invariant()
    def nothing_lost(self) -> None:
        # The server's queue depth equals what the model still expects delivered.
        pending = sum(len(u.pending) for u in self.users.values())
        depth = self.sh.run(self.sh.h.core.service.storage.queue_depth())
        assert depth == pending + Messaging.baseline, (depth, pending)

    baseline = 0


@pytest.fixture(scope="module")
def machine_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncHarness]:
    with sync_harness(tmp_path_factory.mktemp("sm"), rate_limit={"enabled": False}) as sh:
        yield sh


def test_messaging_model(machine_harness: SyncHarness) -> None:
    Messaging.sh = machine_harness
    Messaging.baseline = machine_harness.run(
        machine_harness.h.core.service.storage.queue_depth())

    class Run(Messaging):
        def teardown(self) -> None:
            # Leave the shared database as found: later examples count from a baseline.
            Messaging.baseline = self.sh.run(self.sh.h.core.service.storage.queue_depth())

    Run.TestCase.settings = settings(
        max_examples=25 * SCALE, stateful_step_count=40, deadline=None,
        derandomize=not os.environ.get("QPQ_SOAK"),  # make test: the same runs each time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    Run.TestCase().runTest()
    # The model really exercised messaging (not only logins): many sends went through.
    sent = machine_harness.h.metrics.registry.get_sample_value("qpq_enqueue_total")
    assert sent is not None and sent >= 50, sent


def test_ops_list_matches_the_dispatcher(machine_harness: SyncHarness) -> None:
    from tests.fuzz.strategies import OPS

    assert set(OPS) == set(machine_harness.h.dispatcher.ops)

