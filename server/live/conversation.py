"""A session's conversation: the messages waiting for an answer, the answer being generated, and the context the
model sees. It speaks to an audience of sinks and knows nothing of sockets; an answer belongs to the session, not
to the connection that asked for it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core import telemetry
from core.errors import LLMError, ProtocolError
from core.flag import Flag
from core.jobs import ContextSummary, JobQueue
from core.llm import LLM, ChatMessage, PieceStream, StreamStats
from core.llm.tokens import Counter, estimate
from core.settings import Settings
from core.store import AI_MESSAGE, USER_MESSAGE, StoredEvent
from core.tasks import TaskSet, succeeded

from .. import protocol
from ..eventlog import EventWriter
from ..metrics import Metrics
from . import answer as answers
from .answer import Answer, StoredNotAnswered, Turn
from .audience import Audience, Sink
from .context import Context
from .running import Running

if TYPE_CHECKING:
    from ..ratelimit import DailyTokenBudget
    from .broker import Broker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Begun:
    """An answer as `_begin` left it for its task: the request sent (`pieces`), or the error that kept it unsent."""

    answer: Answer
    context: Context
    messages: list[ChatMessage] | None = None
    pieces: PieceStream | None = None
    error: LLMError | None = None
    started_ns: int = field(default_factory=time.time_ns)


# A compaction asked for and not seen landing within this is asked for again (a lost announcement, a worker that
# gave up): the worker then publishes the summary it has, or writes a newer one.
COMPACT_RETRY_S = 60.0


class Conversation:
    """Answers one message at a time, in the order received; every message and answer goes to the event log.

    `submit` never waits. `cancel` stops only the answer streaming now (its partial text is stored); `stop` also
    forgets what waits (ON_DISCONNECT=cancel, a takeover by another server); `drain` lets the answer in flight
    finish and starts no other; `interrupt` ends it as `interrupted` (shutdown past its drain time).
    """

    def __init__(
        self,
        session_id: str,
        *,
        writer: EventWriter,
        llm: LLM,
        settings: Settings,
        metrics: Metrics,
        broker: Broker | None = None,
        jobs: JobQueue | None = None,
        budget: DailyTokenBudget | None = None,
        count: Counter = estimate,
    ) -> None:
        self.session_id = session_id
        self._broker = broker
        self._publisher = None if broker is None else broker.publisher(session_id)
        self.running = Running()
        self._tasks = TaskSet()
        self._writer = writer
        self._llm = llm
        self._settings = settings
        self._metrics = metrics
        self._jobs = jobs
        self._budget = budget
        self._count = count
        self.context = self._new_context()
        # The compaction asked of the worker and not yet applied: (its cursor, when asked, loop time).
        self._compacting: tuple[int, float] | None = None
        self.audience = Audience()
        # client_msg_id -> its stored id, or the future of it while the write is pending.
        self._client_msgs: dict[str, int | asyncio.Future[int]] = {}
        # At most MAX_PENDING_MESSAGES: a list (an empty deque costs 600 bytes per session).
        self._waiting: list[Turn] = []
        self._task: asyncio.Task[None] | None = None
        self._streaming = False
        self._cancel_asked = False
        self._interrupting = False
        self._draining = False
        # While a stop is under way: messages are still stored, but not answered.
        self._stopping = False
        self._quiet = Flag(True)
        # User messages accepted over the session's life (MAX_TURNS_PER_SESSION), and the newest message's write.
        self.turns = 0
        self.last_message: asyncio.Future[int] | None = None
        self.last_stats = StreamStats()
        # Tokens the session's answers used (SESSION_MAX_TOKENS), and the user it belongs to (USER_DAILY_MAX_TOKENS).
        self.tokens_used = 0
        self.owner: str | None = None

    def _new_context(self) -> Context:
        s = self._settings
        return Context(s.system_prompt, budget=s.context_max_tokens, compact_at=s.context_compact_at, count=self._count)

    def reload(self, history: list[StoredEvent], summary: StoredEvent | None) -> None:
        """The context rebuilt from the store (another server answered meanwhile). Messages still waiting here are
        left out: each joins the context when its turn comes, after the answers before it."""
        waiting = {t.stored.result() for t in self._waiting if t.stored is not None and succeeded(t.stored)}
        self.context = self._new_context()
        self.context.load((e for e in history if e.id not in waiting), summary)

    def load(self, history: list[StoredEvent], summary: StoredEvent | None, *, turns: int, tokens_used: int) -> None:
        """The context from the store: the last context summary and the messages after it."""
        self.context.load(history, summary)
        for event in history:
            if event.event_type == USER_MESSAGE and event.client_msg_id is not None:
                self._client_msgs[event.client_msg_id] = event.id
        self.turns = turns
        self.tokens_used = tokens_used

    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._waiting) or self.running.remote is not None

    async def quiet(self) -> None:
        """Return once no answer is running and none is waiting."""
        await self._quiet.wait()

    def active_response(self) -> dict[str, Any] | None:
        """The answer being generated now, here or on another server, as `session.ready` names it."""
        return self.running.active_response()

    def join(self, sink: Sink, *, history_through: int, resume: tuple[str, int] | None = None) -> None:
        """See `Running.join`."""
        self.running.join(sink, history_through=history_through, resume=resume)

    def known(self, client_msg_id: str | None) -> int | asyncio.Future[int] | None:
        """The stored id (or its pending write) of a message already accepted under this client_msg_id."""
        return None if client_msg_id is None else self._client_msgs.get(client_msg_id)

    def submit(self, text: str, client_msg_id: str | None, received_at: float) -> asyncio.Future[int]:
        """Accept a user message: stored, and answered in turn. Raises ProtocolError when it is not accepted;
        while draining it is stored and then refused for answering (`shutting_down`)."""
        settings = self._settings
        if self.turns >= settings.max_turns_per_session:
            # The protocol has no code of its own for this; `rate_limited` with a message that says which limit.
            limit = settings.max_turns_per_session
            raise ProtocolError(
                protocol.RATE_LIMITED, f"this session has reached its limit of {limit} turns; start a new session"
            )
        self._check_budgets()
        if self.busy and len(self._waiting) >= settings.max_pending_messages:
            raise ProtocolError(protocol.BUSY, "too many messages are waiting for an answer")
        if not self.context.fits(text):
            raise ProtocolError(
                protocol.MESSAGE_TOO_LONG,
                f"this message does not fit the model's context budget ({settings.context_max_tokens} tokens)",
            )
        stored = self.last_message = self.record(USER_MESSAGE, text, client_msg_id=client_msg_id)
        if client_msg_id is not None:
            self._client_msgs[client_msg_id] = stored
        stored.add_done_callback(lambda f: self._user_stored(f, client_msg_id, text))
        self.turns += 1
        self._metrics.messages_accepted.inc()
        if self._draining:
            raise StoredNotAnswered(stored, client_msg_id)
        if self._stopping:
            return stored
        # The connection's trace (set on the writer when it attached): a frame is handled in no task of its own.
        self._waiting.append(Turn(text, client_msg_id, received_at, stored, self._writer.trace))
        if self._task is None and self.running.remote is None:
            self._next()
        return stored

    def _check_budgets(self) -> None:
        """SESSION_MAX_TOKENS and USER_DAILY_MAX_TOKENS: a message past either is refused, not stored."""
        limit = self._settings.session_max_tokens
        if limit is not None and self.tokens_used >= limit:
            raise ProtocolError(
                protocol.BUDGET_EXCEEDED,
                f"this session has used its budget of {limit} tokens ({self.tokens_used} used); start a new session",
            )
        if self._budget is not None and self.owner is not None and not self._budget.allows(self.owner):
            raise ProtocolError(
                protocol.BUDGET_EXCEEDED,
                f"you have used today's budget of {self._settings.user_daily_max_tokens} tokens; "
                "it renews at 00:00 UTC",
            )

    def cancel(self) -> None:
        """Stop the answer streaming now, if any, here or on the server that generates it; its `response.done`
        says `cancelled`."""
        if self._task is None:
            if self.running.remote is not None and self._broker is not None:
                self._tasks.spawn(self._broker.cancel(self.session_id, self.running.remote.response_id))
            return
        if self._streaming:
            self._task.cancel()
        else:
            self._cancel_asked = True

    def cancel_response(self, response_id: str) -> None:
        """Another server's connection cancelled this session's answer."""
        if self.running.local is not None and self.running.local[1].response_id == response_id:
            self.cancel()

    def hand_over(self) -> None:
        """Another server holds the session now: the answer in flight finishes here, nothing else starts."""
        self._waiting.clear()

    def remote_finished(self) -> None:
        """The other server's answer is stored (and the context reloaded): what waits here is answered now."""
        self.running.remote = None
        if self._task is None:
            self._next()

    async def stop(self) -> None:
        """Cancel the answer, forget what waits, and return once the answer's end is recorded. The conversation
        then takes messages again."""
        self._stopping = True
        try:
            self._waiting.clear()
            task = self._task
            if task is not None:
                self.cancel()
                await asyncio.wait((task,))
        finally:
            self._stopping = False

    async def drain(self) -> None:
        """Shutdown: let the answer in flight finish; start no other."""
        self._draining = True
        self._waiting.clear()
        if self._task is not None:
            await asyncio.wait((self._task,))

    async def interrupt(self) -> None:
        """Shutdown past its drain time: end the answer as `interrupted`, its text so far stored."""
        self._draining = self._interrupting = True
        self._waiting.clear()
        task = self._task
        if task is not None:
            self.cancel()
            await asyncio.wait((task,))

    def summarised(self, summary: ContextSummary) -> None:
        """The worker stored a new context summary: the next request starts from it. An answer streaming now
        keeps the request it was sent with."""
        changed = self.context.summarised(summary.text, through=summary.through, tokens=summary.tokens)
        if self._compacting is not None and self._compacting[0] <= summary.through:
            self._compacting = None
        if changed is None:
            return
        before, after = changed
        self._metrics.context_compactions.labels("applied").inc()
        log.info(
            "context compacted",
            extra={
                "fields": {"session_id": self.session_id, "through": summary.through, "before": before, "after": after}
            },
        )
        self.audience.put(protocol.context_compacted(summary.through, tokens_before=before, tokens_after=after))

    def record(
        self, event_type: str, content: str | None, metadata: dict[str, Any] | None = None, **keys: str | None
    ) -> asyncio.Future[int]:
        """Append an event of this session to the event log (see `EventWriter.record`)."""
        return self._writer.record(self.session_id, event_type, content, metadata, **keys)

    # Answering.

    def _next(self) -> None:
        self._cancel_asked = False
        if self._waiting and not (self._draining or self._stopping):
            self._quiet.clear()
            turn = self._waiting.pop(0)
            # Begun here, with no await: the upstream request leaves before this frame's handler returns (a task's
            # first step would wait a turn of the loop, about 0.1 ms, on Python 3.11).
            begun = self._begin(turn)
            self._task = asyncio.create_task(self._turn(turn, begun), name=f"answer:{self.session_id}")
        else:
            self._task = None
            self.running.local = None
            self._quiet.set()

    def _begin(self, turn: Turn) -> _Begun:
        """The answer's start: the message joins the context, `response.started` is queued, and the request is
        sent (an LLM whose `stream` starts it at the call, as OpenAILLM does)."""
        begun = _Begun(Answer("resp_" + secrets.token_hex(8)), self.context)
        answer, context = begun.answer, begun.context
        self.running.local = (turn, answer)
        context.add("user", turn.text, stored=turn.stored)
        if self._publisher is not None:
            self._publisher.started(answer, turn.client_msg_id)
        # Queued, not awaited: it goes out right after the upstream request is written; the deltas queue behind it.
        self.audience.put(protocol.response_started(answer.response_id, turn.client_msg_id))
        try:
            begun.messages, dropped = context.request()
        except LLMError as e:
            begun.error = e
            return begun
        answer.request_tokens = context.tokens
        if dropped:
            self._metrics.context_trimmed.inc(dropped)
        try:
            begun.pieces = self._llm.stream(begun.messages, answer.stats)
        except Exception as e:
            # A model's failures come with its reads; this is a bug, and it must not reach the frame handler.
            log.error("answer crashed", exc_info=e, extra={"fields": {"session_id": self.session_id}})
            begun.error = LLMError("the answer failed unexpectedly")
        return begun

    async def _turn(self, turn: Turn, begun: _Begun) -> None:
        """One answer, in a GenAI `chat` span (a child of the connection's session span) when tracing is on."""
        model = self._llm.model
        with telemetry.span(
            f"chat {model}",
            kind="CLIENT",
            parent=turn.trace,
            attributes=telemetry.chat_attributes(model),
            start_time=begun.started_ns,
        ) as span:
            if span is not None and begun.messages:
                telemetry.chat_request(begun.messages)
            if self._jobs is not None and begun.messages is not None and begun.context.wants_compaction():
                # Here, in the chat span, which the worker's compaction joins as a child.
                self._compact(begun.context)
            status, error, text = await self._answer(turn, begun)
            if span is not None:
                span.set_attribute("rt.response.status", status)
            telemetry.chat_finished(
                span, self.last_stats, error_type=None if error is None else error.code, output=text
            )
        self._next()

    async def _answer(self, turn: Turn, begun: _Begun) -> tuple[str, LLMError | None, str]:
        audience, answer, context = self.audience, begun.answer, begun.context
        status, error = await self._stream(begun)
        self.running.local = None
        text = self._settings.fallback_text if error is not None else answer.text
        stats = answer.stats
        if stats.prompt_tokens is not None:
            context.observed(stats.prompt_tokens)
        error_code, error_message = (None, "") if error is None else (error.code, str(error))
        done = protocol.response_done(
            answer.response_id, status=status, text=text, error_code=error_code, error_message=error_message
        )
        await audience.send(done)
        if self._publisher is not None:
            self._publisher.done(status=status, text=text, error_code=error_code, error_message=error_message)
        meta = answers.metadata(answer, turn, status=status, model=self._llm.model, error=error)
        spent = answers.answer_tokens(meta)
        self.tokens_used += spent
        if self._budget is not None and self.owner is not None:
            self._budget.spend(self.owner, spent)
        self.last_message = stored = self.record(AI_MESSAGE, text, meta, event_key=answer.response_id)
        if error is None and self.context is context:
            # The provider's count of a whole answer is its count as context too; a cut one is estimated.
            exact = status == protocol.COMPLETED and not answer.truncated
            context.add("assistant", text, stored=stored, tokens=stats.completion_tokens if exact else None)
        rid = answer.response_id
        stored.add_done_callback(lambda f: self._answer_stored(f, rid, text, status))
        answers.observe(self._metrics, self.session_id, answer, status=status, error=error, model=self._llm.model)
        self.last_stats = stats
        return status, error, text

    async def _stream(self, begun: _Begun) -> tuple[str, LLMError | None]:
        pieces = begun.pieces
        if pieces is None:
            return protocol.FAILED, begun.error
        if self._cancel_asked:
            # Cancelled between the request's start and this task's first step: the request is closed unread.
            await pieces.aclose()
            return protocol.CANCELLED, None
        self._streaming = True
        try:
            await answers.stream(
                pieces, begun.answer, self.audience, self._publisher, max_chars=self._settings.max_answer_chars
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return (protocol.INTERRUPTED if self._interrupting else protocol.CANCELLED), None
        except LLMError as e:
            return protocol.FAILED, e
        except Exception as e:
            log.error("answer crashed", exc_info=e, extra={"fields": {"session_id": self.session_id}})
            return protocol.FAILED, LLMError("the answer failed unexpectedly")
        finally:
            self._streaming = False
        return protocol.COMPLETED, None

    def _compact(self, context: Context) -> None:
        """Ask the worker for a new context summary, unless one is asked for already (and not overdue)."""
        assert self._jobs is not None
        now = asyncio.get_running_loop().time()
        if self._compacting is not None and now - self._compacting[1] < COMPACT_RETRY_S:
            return
        through = context.compaction_cursor()
        if through is None:
            return
        self._compacting = (through, now)
        self._metrics.context_compactions.labels("requested").inc()
        self._tasks.spawn(self._jobs.compact(self.session_id, through=through, tokens=context.tokens))

    def _answer_stored(self, stored: asyncio.Future[int], response_id: str, text: str, status: str) -> None:
        if not succeeded(stored):
            return
        frame = protocol.answer_stored(stored.result(), response_id, text=text, status=status)
        # Kept for a connection whose history was read just before this answer landed (see `join`).
        self.running.last_stored = (stored.result(), frame)
        self.audience.put(frame)
        if self._publisher is not None:
            self._publisher.stored_answer(stored.result(), response_id, text=text, status=status)

    def _user_stored(self, stored: asyncio.Future[int], client_msg_id: str | None, text: str) -> None:
        if not succeeded(stored):
            # Never stored: forget it, so the client's retry is taken as new.
            if client_msg_id is not None and self._client_msgs.get(client_msg_id) is stored:
                del self._client_msgs[client_msg_id]
            return
        if client_msg_id is not None:
            self._client_msgs[client_msg_id] = stored.result()
        # The sender is acknowledged by its connection; watchers see the message it sent.
        if self.audience.watchers:
            self.audience.put_watchers(protocol.user_message_stored(stored.result(), client_msg_id, text))
        if self._publisher is not None:
            self._publisher.stored_message(stored.result(), client_msg_id, text)
