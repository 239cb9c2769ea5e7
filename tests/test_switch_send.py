"""`Switch.send`: frames a port makes itself (a gateway's reply, a TUN host's ARP) leave from
the call that made them: after the batch whose frame they answer, in the same `forward`,
never from inside a port's `deliver`; ports answering each other are bounded in rounds."""

from netstack.frame import Frame
from netstack.port import OUTBOX_FRAMES, Port, SpeakingPort
from netstack.switch import SEND_ROUNDS, Switch

A = bytes.fromhex("020000000001")
C = bytes.fromhex("020000000003")
S1 = bytes.fromhex("020000000011")
S2 = bytes.fromhex("020000000012")
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> Frame:
    return Frame(dst + src + b"\x08\x00" + payload)


class Recorder(Port):
    def __init__(self, name: str, log: list) -> None:
        super().__init__(name)
        self.log = log

    def deliver(self, frames: list[Frame]) -> None:
        self.log.append((self.name, [bytes(f.data) for f in frames]))


class Speaker(SpeakingPort):
    """Answers every frame, to its sender or to `answer_to`, wired to the switch as the
    hub wires its gateway (`on_ready` hands it to `Switch.send`; what `send` leaves is for
    the shell: counted in `left`).  `depth` records how deep in `forward` calls it was."""

    def __init__(self, name: str, mac: bytes, switch: Switch, log: list,
                 answer_to: bytes | None = None) -> None:
        super().__init__(name)
        self.mac, self.switch, self.log, self.answer_to = mac, switch, log, answer_to
        self.left = 0
        self.on_ready = self._ready
        self.forwarding = 0
        self.depths: list[int] = []

    def _ready(self) -> None:
        if not self.switch.send(self):
            self.left += 1

    def deliver(self, frames: list[Frame]) -> None:
        self.log.append((self.name, [bytes(f.data) for f in frames]))
        self.depths.append(forward_depth[0])
        self._send([eth(self.answer_to or bytes(f.data[6:12]), self.mac, b"answer" * 8)
                    for f in frames])


forward_depth = [0]


def counting(switch: Switch) -> Switch:
    """`switch` with its forward calls' nesting recorded in `forward_depth`."""
    forward = switch.forward

    def counted(ingress: Port, frames: list[Frame]) -> None:
        forward_depth[0] += 1
        try:
            forward(ingress, frames)
        finally:
            forward_depth[0] -= 1

    switch.forward = counted
    return switch


def test_an_answer_to_a_frame_of_a_batch_leaves_after_the_whole_batch_in_the_same_forward():
    log: list = []
    switch = Switch()
    a, c = Recorder("a", log), Recorder("c", log)
    speaker = Speaker("speaker", S1, switch, log)
    for port in (speaker, a, c):  # the speaker first: the batch's flood reaches it first
        switch.attach(port)
    request = eth(BROADCAST, A)
    switch.forward(a, [request])
    answer = eth(A, S1, b"answer" * 8)
    assert log == [("speaker", [request.data]), ("c", [request.data]), ("a", [answer.data])]
    assert speaker.outbox == [] and speaker.left == 0


def test_frames_a_port_makes_outside_any_delivery_leave_at_once():
    log: list = []
    switch = Switch()
    a = Recorder("a", log)
    speaker = Speaker("speaker", S1, switch, log)
    switch.attach(speaker)
    switch.attach(a)
    switch.forward(a, [eth(C, A)])  # learns A; floods, the speaker ignores nothing
    log.clear()
    speaker._send([eth(A, S1, b"timer" * 8)])  # as a timer or a NAT socket's handler does
    assert log == [("a", [eth(A, S1, b"timer" * 8).data])]
    assert speaker.outbox == []


def test_ports_answering_each_other_get_bounded_rounds_then_wait_for_their_shells():
    log: list = []
    switch = counting(Switch())
    a = Recorder("a", log)
    s1 = Speaker("s1", S1, switch, log, answer_to=S2)
    s2 = Speaker("s2", S2, switch, log, answer_to=S1)
    for port in (a, s1, s2):
        switch.attach(port)
    switch.reserve(s1, S1, [])
    switch.reserve(s2, S2, [])
    switch.forward(a, [eth(S1, A)])
    answers = [name for name, _ in log]
    assert answers == ["s1"] + ["s2", "s1"] * (SEND_ROUNDS // 2) + ["s2"] * (SEND_ROUNDS % 2)
    # The rest waits in the last speaker's outbox for its shell (woken once), bounded.
    last = s2 if SEND_ROUNDS % 2 else s1
    assert last.left == 1 and len(last.outbox) == 1
    assert s1.depths == [1] + [2] * (len(s1.depths) - 1)  # never deeper than one send
    assert max(s2.depths) == 2
    assert not any(p.counters.drops for p in (a, s1, s2))
    # The shell forwards what was left: as many rounds again, then it waits once more.
    log.clear()
    switch.forward(last, last.take_outbox())
    assert len(log) == SEND_ROUNDS + 1 and last.left + (s1 if last is s2 else s2).left == 2


def test_a_speaking_ports_answers_are_bounded_by_its_outbox_when_the_shell_is_slow():
    log: list = []
    switch = Switch()
    a = Recorder("a", log)
    speaker = Speaker("speaker", S1, switch, log)
    speaker.on_ready = None  # no shell yet: everything waits in the outbox
    switch.attach(speaker)
    switch.attach(a)
    switch.reserve(speaker, S1, [])
    switch.forward(a, [eth(S1, A)] * (OUTBOX_FRAMES + 5))
    assert len(speaker.outbox) == OUTBOX_FRAMES
    assert speaker.counters.drops == {"outbox_full": 5}


class RaisingSpeaker(Speaker):
    """Answers, then raises: a port's bug in the middle of the answers' rounds."""

    def deliver(self, frames: list[Frame]) -> None:
        super().deliver(frames)
        raise RuntimeError("a bug in the middle of a send")


def test_a_port_raising_while_answers_are_sent_leaves_the_switch_sending_at_once_after():
    log: list = []
    switch = Switch()
    a = Recorder("a", log)
    s1 = Speaker("s1", S1, switch, log, answer_to=S2)
    s2 = RaisingSpeaker("s2", S2, switch, log, answer_to=A)
    for port in (a, s1, s2):
        switch.attach(port)
    switch.reserve(s1, S1, [])
    switch.reserve(s2, S2, [])
    switch.forward(a, [eth(C, A)])  # learns A (flooded: both answer, s2 raises twice)
    log.clear()
    raised = s2.counters.drops["internal_error"]
    for _ in range(2):  # s1 answers s2, which answers a and raises: the same both times
        switch.forward(a, [eth(S1, A)])
        assert [name for name, _ in log] == ["s1", "s2", "a"]
        log.clear()
    assert s2.counters.drops["internal_error"] == raised + 2
    assert s1.outbox == s2.outbox == [] and s1.left == s2.left == 0
    # No delivery under way any more: a timer's frame leaves at once.
    s1._send([eth(A, S1, b"timer" * 8)])
    assert log == [("a", [eth(A, S1, b"timer" * 8).data])]
