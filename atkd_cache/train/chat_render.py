"""A student that renders chats with its own chat template (issue 32), for the loader's
alignment step (train/align.py).

The cache holds the teacher's rendering of each conversation (its chat markers, its default
system prompt). A student of another family was trained on its own markers, so it should
read its own rendering. This module turns the one into the other and says which bytes of
the two texts are the same:

    Template(tokenizer)        the literal text a chat template writes around the messages,
                               learnt by rendering conversations whose contents are sentinels
    parse(text, template)      a rendered text back into its messages (role, content, where)
    Rerender(teacher, student) the student's text for a cached teacher text, and the byte
                               spans of the two that pair up: each message's content (the same
                               bytes on both sides) and, after each reply, the teacher's
                               end-of-turn token(s) with the student's

Parsing takes, after each message's content, the earliest separator the template writes
before a next message. Both sides are checked by rendering the parsed messages again: a
template that is not of this per-message form, a text that is not a rendering of it, and a
student template that changes a message's content (trims it, drops an earlier turn's
reasoning) are refused in one line rather than aligned wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atkd_cache.errors import UserError

SENTINEL = "zqATKD{}qz"  # letters only: survives trimming and escaping
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str
    start: int  # character offsets of the content in the rendered text
    end: int


@dataclass
class Template:
    """What one chat template writes around message contents."""

    tokenizer: object
    start: dict[str, str] = field(default_factory=dict)  # first message's role -> text before it
    sep: dict[tuple[str, str], str] = field(default_factory=dict)  # (role, next) -> between
    end: dict[str, str] = field(default_factory=dict)  # last message's role -> text after it
    reply: str = ""  # after the last user content when a reply is asked for
    end_of_turn: str = ""  # what a model emits to end a reply: end["assistant"] through its
    #                        first special token ("<|im_end|>", "<|eot_id|>"); "" if none

    def render(self, messages: list[dict], reply: bool = False) -> str:
        """apply_chat_template as text (with the generation prompt when `reply`)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=reply)


def _pieces(tokenizer, roles: tuple[str, ...], reply: bool = False) -> list[str] | None:
    """The literal texts between the sentinel contents of a rendered conversation (len(roles)
    + 1 of them), or None when the template refuses that conversation."""
    messages = [{"role": r, "content": SENTINEL.format(i)} for i, r in enumerate(roles)]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=reply)
    except Exception:  # a template that raises on this shape (no system role, say)
        return None
    pieces, pos = [], 0
    for i in range(len(roles)):
        at = text.find(SENTINEL.format(i), pos)
        if at < 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(SENTINEL.format(i))
    return pieces + [text[pos:]]


def learn_template(tokenizer, who: str) -> Template:
    """The literals of `tokenizer`'s chat template; one line when it has none or does not
    render a plain user/assistant conversation with its contents in place."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{who} has no chat template: --student-chat-template needs one on "
                        f"both sides (or leave the flag off to read the teacher's rendering)")
    t = Template(tokenizer)
    turns = _pieces(tokenizer, ("user", "assistant", "user", "assistant"))
    asked = _pieces(tokenizer, ("user",), reply=True)
    open_user = _pieces(tokenizer, ("user", "assistant", "user"))
    if turns is None or asked is None or open_user is None:
        raise UserError(f"{who}: its chat template does not render a user/assistant "
                        f"conversation with the contents in place, so the student's rendering "
                        f"cannot be paired with the teacher's")
    t.start["user"], t.sep["user", "assistant"], t.sep["assistant", "user"] = turns[:3]
    t.end["assistant"], t.end["user"], t.reply = turns[4], open_user[3], asked[1]
    system = _pieces(tokenizer, ("system", "user", "assistant"))
    if system is not None:  # (a template without a system role parses chats without one)
        t.start["system"], t.sep["system", "user"] = system[:2]
    specials = [s for s in getattr(tokenizer, "all_special_tokens", [])
                + list(tokenizer.get_added_vocab()) if s]
    ends = [t.end["assistant"].find(s) + len(s) for s in specials
            if s in t.end["assistant"]]
    t.end_of_turn = t.end["assistant"][:min(ends)] if ends else ""
    return t


def parse(text: str, t: Template) -> tuple[list[Message], str] | None:
    """The messages of a text rendered by `t` and how it ends: "end" (as the template ends a
    conversation), "eot" (a reply ended by its end-of-turn token, as a model stops) or "cut"
    (cut short: the reply budget, or max_length); None when the text does not start as `t`
    renders."""
    starts = [(len(s), r) for r, s in t.start.items() if text.startswith(s)]
    if not starts:
        return None
    pos, role = max(starts)  # (a default system prompt is the template's own, not a message)
    messages = []
    while True:
        nexts = [(text.find(s, pos), -len(s), b) for (a, b), s in t.sep.items() if a == role]
        if role == "user" and t.reply:
            nexts.append((text.find(t.reply, pos), -len(t.reply), "assistant"))
        nexts = [n for n in nexts if n[0] >= 0]
        if nexts:
            at, neg, nxt = min(nexts)
            messages.append(Message(role, text[pos:at], pos, at))
            pos, role = at - neg, nxt
            continue
        ending, at = "cut", len(text)
        for kind, tail in (("eot", t.end_of_turn if role == "assistant" else ""),
                           ("end", t.end.get(role, ""))):  # (end wins where both fit)
            if tail and text.endswith(tail) and len(text) - len(tail) >= pos:
                ending, at = kind, len(text) - len(tail)
        messages.append(Message(role, text[pos:at], pos, at))
        return messages, ending


def render(messages: list[Message], ending: str, t: Template) -> str:
    """Render `messages` with `t`, ending as `ending` says (parse's words); a conversation
    cut inside a prompt is rendered without that message."""
    plain = [{"role": m.role, "content": m.content} for m in messages]
    if ending == "end":
        return t.render(plain)
    if messages[-1].role == "assistant":
        tail = t.end_of_turn if ending == "eot" else ""
        return t.render(plain[:-1], reply=True) + messages[-1].content + tail
    return t.render(plain[:-1])


@dataclass
class Rendered:
    """A cached text's student rendering and the byte spans of the two that pair up."""

    text: str
    pairs: list[tuple[int, int, int, int, bool]]  # teacher [lo, hi), student [lo, hi), and
    #   whether the pair is one chunk (an end-of-turn pair) or is cut where both sides can


class Rerender:
    """Teacher text -> student text, with the spans that hold the same content."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher = learn_template(teacher_tokenizer, "the cache's teacher tokenizer")
        self.student = learn_template(student_tokenizer, "the student's tokenizer")

    def __call__(self, text: str, where: str) -> Rendered:
        """The student's rendering of one cached text; UserError (one line) when the text is
        not the teacher template's rendering of a chat, or the student's template changes a
        message's content."""
        parsed = parse(text, self.teacher)
        ok = parsed is not None and (len(parsed[0]) > 1 or parsed[1] == "end")
        if ok:
            messages, ending = parsed
            if ending == "cut" and messages[-1].role != "assistant":  # cut inside a prompt
                messages, ending = messages[:-1], "end"
                ok = text.startswith(render(messages, ending, self.teacher))
            else:
                ok = render(messages, ending, self.teacher) == text
        if not ok:
            raise UserError(f"{where}: its text is not the teacher's chat template rendering "
                            f"of a conversation, so the student cannot render it with its own "
                            f"template: leave --student-chat-template off for this cache")
        s_text = render(messages, ending, self.student)
        s_messages = (parse(s_text, self.student) or ([], ""))[0]
        got = [(m.role, m.content) for m in s_messages]
        want = [(m.role, m.content) for m in messages]
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                       min(len(got), len(want)))
            raise UserError(f"{where}: message {bad}'s bytes differ after the student's chat "
                            f"template renders it (the template trims or rewrites contents), "
                            f"so teacher and student text cannot be paired: leave "
                            f"--student-chat-template off, or give the student a template "
                            f"that keeps contents as they are")
        t_at, s_at = _byte_offsets(text), _byte_offsets(s_text)
        te, se = self.teacher.end_of_turn, self.student.end_of_turn
        pairs = []
        for tm, sm in zip(messages, s_messages, strict=True):
            pairs.append((t_at(tm.start), t_at(tm.end), s_at(sm.start), s_at(sm.end), False))
            if tm.role == "assistant" and te and se and text.startswith(te, tm.end) \
                    and s_text.startswith(se, sm.end):
                pairs.append((t_at(tm.end), t_at(tm.end + len(te)), s_at(sm.end),
                              s_at(sm.end + len(se)), True))
        return Rendered(s_text, pairs)


def _byte_offsets(text: str):
    """char offset -> byte offset in text's UTF-8."""
    cum = [0]
    for ch in text:
        cum.append(cum[-1] + len(ch.encode("utf-8")))
    return lambda i: cum[i]
