"""The probability view: generated text as HTML, each token coloured by how likely the model found it.

Pure functions of the tokens (no Streamlit), so the page can redraw them and tests can read them.
"""

from __future__ import annotations

import html

from quillgpt.playground.backend import TokenView


def prob_colour(p: float) -> str:
    """Red for tokens the model found unlikely, through yellow, to green for the ones it expected."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 75%, 80%)"


def _shown(text: str) -> str:
    return repr(text)


def token_tip(t: TokenView) -> str:
    head = f"{_shown(t.text)}  {t.prob:.1%}" if t.prob is not None else _shown(t.text)
    if not t.top:
        return head
    return head + "\nmost likely here:\n" + "\n".join(f"  {_shown(a)}  {p:.1%}" for a, p in t.top)


def render_tokens(prompt: str, text: str, tokens: list[TokenView], live: bool = False) -> str:
    """HTML for the prompt then the generated text, each token coloured by its probability, with its
    alternatives in a tooltip (on hover, or on focus: click a token). `text` is the truth: token texts
    are laid over it, so a stop string's tokens, generated but not shown, fall off the end.

    `live`: the text is still streaming in: a cursor ends it, and the tooltips wait for the last
    redraw (they are most of the HTML, and the browser re-reads all of it at every redraw)."""
    parts = ['<div class="quill-output">', f'<span class="quill-prompt">{html.escape(prompt)}</span>']
    pos = 0
    for i, t in enumerate(tokens):
        if pos >= len(text):
            break
        piece = text[pos : pos + len(t.text)]
        pos += len(piece)
        style = f' style="background:{prob_colour(t.prob)}"' if t.prob is not None else ""
        body = html.escape(piece)
        if piece.strip("\n") == "":  # a newline token: give it something to hover
            body = '<span class="quill-nl">↵</span>' + body
        tip = "" if live else f' tabindex="0" data-i="{i}" data-tip="{html.escape(token_tip(t))}"'
        parts.append(f'<span class="quill-tok"{style}{tip}>{body}</span>')
    if pos < len(text):
        parts.append(html.escape(text[pos:]))
    if live:
        parts.append('<span class="quill-cursor">▌</span>')
    parts.append("</div>")
    return "".join(parts)


CSS = """<style>
[data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
.quill-output { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 0.95rem; line-height: 1.75; padding: 0.9rem 1rem; border-radius: 0.5rem;
  border: 1px solid rgba(128, 128, 128, 0.35); overflow-wrap: anywhere; }
.quill-prompt { font-weight: 700; opacity: 0.8; }
.quill-tok { position: relative; color: #1b1b1b; border-radius: 3px; padding: 1px 0; cursor: help; }
.quill-tok:hover, .quill-tok:focus { outline: 2px solid #1f6feb; }
.quill-tok:hover::after, .quill-tok:focus::after { content: attr(data-tip); position: absolute; left: 0;
  top: 100%; margin-top: 5px; z-index: 100; white-space: pre; pointer-events: none; font-size: 0.8rem;
  line-height: 1.45; padding: 0.45rem 0.65rem; border-radius: 6px; background: #262730; color: #fafafa;
  box-shadow: 0 3px 10px rgba(0, 0, 0, 0.3); }
.quill-nl { opacity: 0.45; }
.quill-cursor { opacity: 0.6; }
.quill-legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; opacity: 0.85; }
.quill-legend .bar { width: 9rem; height: 0.7rem; border-radius: 3px;
  background: linear-gradient(to right, hsl(0,75%,80%), hsl(60,75%,80%), hsl(120,75%,80%)); }
</style>"""

LEGEND = (
    '<div class="quill-legend"><span>unlikely</span><span class="bar"></span><span>likely</span>'
    "<span>— each token's probability under the model (before temperature and filters); "
    "hover or click a token for the alternatives</span></div>"
)
