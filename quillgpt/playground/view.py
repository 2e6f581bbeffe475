"""The probability view: generated text as HTML, each token coloured by how likely the model found it.

Pure functions of the tokens (no Streamlit), so the page can redraw them and tests can read them.
"""

from __future__ import annotations

import html

from quillgpt.playground.backend import TokenView


def prob_colour(p: float) -> str:
    """Red for tokens the model found unlikely, through yellow, to green for the ones it expected."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 75%, 80%)"


# A token's colour is one of SHADES classes (`CSS` defines them), not a style of its own: every span
# then carries less for the browser to parse, sanitize and style (docs/results.md).
SHADES = 20


def prob_class(p: float) -> str:
    """The colour class of a token the model gave probability p: p0 (unlikely) to p20 (certain); a NaN
    (a broken model's) counts as unlikely rather than failing the page."""
    return f"p{round(SHADES * min(max(p, 0.0), 1.0))}" if p == p else "p0"


def _shown(text: str) -> str:
    return repr(text)


def token_tip(t: TokenView) -> tuple[str, str]:
    """A token's tooltip: its own line (text and probability), and the alternatives' lines, if any."""
    own = f"{_shown(t.text)}  {t.prob:.1%}" if t.prob is not None else _shown(t.text)
    return own, "\n  ".join(f"{_shown(a)}  {p:.1%}" for a, p in t.top)  # `CSS` indents the first


def _attr(value: str) -> str:
    # a double-quoted attribute needs &, <, > and " escaped, not the ' of every repr
    return html.escape(value, quote=False).replace('"', "&quot;")


def _token_html(t: TokenView, piece: str) -> str:
    """One token's span, with its alternatives in a tooltip (`CSS` lays out the two attributes)."""
    shade = f" {prob_class(t.prob)}" if t.prob is not None else ""
    own, top = token_tip(t)
    tip = f' data-tip="{_attr(own)}"' + (f' data-top="{_attr(top)}"' if top else "")
    body = html.escape(piece)
    if piece.strip("\n") == "":  # a newline token: give it something to hover
        body = '<span class="quill-nl">↵</span>' + body
    return f'<span class="quill-tok{shade}" tabindex="0"{tip}>{body}</span>'


def alternatives_html(t: TokenView) -> str:
    """The token inspector's table: the tokens the model found most likely where `t` was sampled, each
    with its probability as a bar. Plain HTML: a data grid (`st.dataframe`) loads two dozen scripts
    into a fresh page the first time it is drawn, and the inspector is drawn with every result."""
    rows = "".join(
        f'<tr><td><code>{html.escape(_shown(a))}</code></td><td class="quill-p">{p:.1%}</td>'
        f'<td class="quill-bar"><span style="width:{100 * min(max(p, 0.0), 1.0):.1f}%"></span></td></tr>'
        for a, p in t.top
    )
    return f'<table class="quill-alternatives"><tr><th>token</th><th colspan="2">probability</th></tr>{rows}</table>'


def render_tokens(prompt: str, text: str, tokens: list[TokenView]) -> str:
    """HTML for the prompt then the generated text, each token coloured by its probability, with its
    alternatives in a tooltip (on hover, or on focus: click a token). `text` is the truth: token texts
    are laid over it, so a stop string's tokens, generated but not shown, fall off the end."""
    return f'<div class="quill-output">{prompt_html(prompt)}{LiveView().finish(text, tokens)}</div>'


def prompt_html(prompt: str) -> str:
    return f'<span class="quill-prompt">{html.escape(prompt)}</span>'


CURSOR = '<span class="quill-cursor">▌</span>'


class LiveView:
    """The probability view drawn in pieces as the text streams in: each update is the HTML of the
    tokens shown since the last one, appended after it (`CSS` lays the pieces out as one text), and
    `finish` draws the rest. The pieces together are `render_tokens`' view, without its frame.

    Redrawing the whole view at every update made each one cost the browser more as the text grew:
    the whole HTML sent, parsed and laid out again; and so did drawing it whole once more at the end."""

    def __init__(self) -> None:
        self.pos = 0
        """Characters of the text drawn so far."""
        self.count = 0
        """Tokens drawn so far."""

    def update(self, text: str, tokens: list[TokenView]) -> str:
        """HTML of the tokens not drawn yet whose text is shown: a token whose text is still held back
        (it may begin a stop string) waits. Empty if there is nothing new."""
        parts = []
        while self.count < len(tokens) and self.pos + len(tokens[self.count].text) <= len(text):
            t = tokens[self.count]
            parts.append(_token_html(t, t.text))
            self.pos += len(t.text)
            self.count += 1
        return "".join(parts)

    def finish(self, text: str, tokens: list[TokenView]) -> str:
        """HTML of everything not drawn yet of the final text: the tokens laid over it (the last one
        cut where the text ends: a stop string's tokens fall off), then any text no token covers."""
        parts = []
        while self.count < len(tokens) and self.pos < len(text):
            t = tokens[self.count]
            piece = text[self.pos : self.pos + len(t.text)]
            parts.append(_token_html(t, piece))
            self.pos += len(piece)
            self.count += 1
        if self.pos < len(text):
            parts.append(html.escape(text[self.pos :]))
            self.pos = len(text)
        return "".join(parts)


CSS = """<style>
[class*="st-key-quill_live_"] { display: block !important; white-space: pre-wrap;
  font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.95rem; line-height: 1.75;
  padding: 0.9rem 1rem; border-radius: 0.5rem; border: 1px solid rgba(128, 128, 128, 0.35);
  overflow-wrap: anywhere; }
[class*="st-key-quill_live_"] > div, [class*="st-key-quill_live_"] .stHtml { display: inline !important; }
[class*="st-key-quill_live_"] > div:not(:last-child) .quill-cursor { display: none; }
[data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
.quill-output { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 0.95rem; line-height: 1.75; padding: 0.9rem 1rem; border-radius: 0.5rem;
  border: 1px solid rgba(128, 128, 128, 0.35); overflow-wrap: anywhere; }
.quill-prompt { font-weight: 700; opacity: 0.8; }
.st-key-quill_sync { display: none; }
.quill-live .quill-status, .quill-live .quill-note { font-size: 0.875rem; opacity: 0.6; margin: 0.5rem 0 0; }
.quill-live .quill-error { margin-top: 0.5rem; padding: 0.75rem 1rem; border-radius: 0.5rem;
  background: rgba(255, 43, 43, 0.09); color: rgb(125, 53, 59); }
.quill-tok { position: relative; color: #1b1b1b; border-radius: 3px; padding: 1px 0; cursor: help; }
.quill-tok:hover, .quill-tok:focus { outline: 2px solid #1f6feb; }
.quill-tok:hover::after, .quill-tok:focus::after { content: attr(data-tip); position: absolute; left: 0;
  top: 100%; margin-top: 5px; z-index: 100; white-space: pre; pointer-events: none; font-size: 0.8rem;
  line-height: 1.45; padding: 0.45rem 0.65rem; border-radius: 6px; background: #262730; color: #fafafa;
  box-shadow: 0 3px 10px rgba(0, 0, 0, 0.3); }
.quill-tok[data-top]:hover::after, .quill-tok[data-top]:focus::after {
  content: attr(data-tip) "\\A most likely here:\\A   " attr(data-top); }
.quill-nl { opacity: 0.45; }
.quill-alternatives { border-collapse: collapse; font-size: 0.85rem; }
.quill-alternatives th { text-align: left; font-weight: 600; opacity: 0.7; padding: 0.2rem 0.6rem; }
.quill-alternatives td { padding: 0.2rem 0.6rem; border-top: 1px solid rgba(128, 128, 128, 0.25); }
.quill-alternatives .quill-p { text-align: right; font-variant-numeric: tabular-nums; }
.quill-alternatives .quill-bar { width: 10rem; }
.quill-alternatives .quill-bar span { display: block; height: 0.6rem; border-radius: 3px; background: #1f6feb; }
.quill-cursor { opacity: 0.6; }
.quill-legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; opacity: 0.85; }
.quill-legend .bar { width: 9rem; height: 0.7rem; border-radius: 3px;
  background: linear-gradient(to right, hsl(0,75%,80%), hsl(60,75%,80%), hsl(120,75%,80%)); }
"""
CSS += "".join(f".quill-tok.p{k} {{ background: {prob_colour(k / SHADES)}; }}\n" for k in range(SHADES + 1))
CSS += "</style>"

LEGEND = (
    '<div class="quill-legend"><span>unlikely</span><span class="bar"></span><span>likely</span>'
    "<span>— each token's probability under the model (before temperature and filters); "
    "hover or click a token for the alternatives</span></div>"
)
