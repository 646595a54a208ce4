"""``seqserve client chat``: an interactive loop over one session.

Each line read from stdin is fed (with its newline) and a reply is generated until the model
produces a newline or ``--max-tokens`` is reached. The session carries over from line to line.
``/quit`` or end of input ends the chat, ``/reset`` starts the conversation over.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .cli_commands import open_session
from .client import Client
from .session import Session

__all__ = ["cmd_chat", "chat_loop"]

QUIT = "/quit"
RESET = "/reset"


def chat_loop(
    session: Session, lines: TextIO, out: TextIO, err: TextIO, interactive: bool, args: argparse.Namespace
) -> int:
    """Read lines until EOF or /quit; stream each reply to ``out``. Returns the number of replies."""
    replies = 0
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = lines.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if text.strip() == QUIT:
            break
        if text.strip() == RESET:
            session.reset()
            err.write("(conversation reset)\n")
            continue
        seed = None if args.seed is None else args.seed + replies
        generation = session.generate(
            text + "\n",
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=seed,
            stop="\n",
        )
        for piece in generation:
            out.write(piece)
            out.flush()
        if not generation.text.endswith("\n"):
            out.write("\n")
            out.flush()
        replies += 1
    return replies


def cmd_chat(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Run the chat loop on a new session (closed at the end) or an existing one (``--session``)."""
    interactive = sys.stdin.isatty()
    with open_session(client, args.model, args.session) as session:
        if interactive:
            sys.stderr.write(f"chatting with {session.model} (session {session.id}); {QUIT} or Ctrl-D to end\n")
        chat_loop(session, sys.stdin, out, sys.stderr, interactive, args)
    return 0
