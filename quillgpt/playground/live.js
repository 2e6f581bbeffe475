// The page's Generate and Stop, sent straight to the playground's routes (quillgpt/playground/live.py):
// the prompt and settings as the page shows them, the view's pieces appended to the page's own
// `.quill-live` elements as they stream back, the status line written here, and then a rerun that hands
// the results to the session. Installed once per page, in the sidebar.
// Never write a "less than" sign right before a letter or a slash in this file: Streamlit's HTML
// sanitizer drops a whole script whose text looks like markup.
(() => {
  if (window.quillLive) return;
  const live = (window.quillLive = {run: 0, controller: null, streaming: false, stopped: 0, bypass: false});
  const SAMPLING = ["temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty", "seed"];

  const anchors = () => [...document.querySelectorAll(".quill-live")];
  const field = (key, tag) => {
    const input = document.querySelector(".st-key-" + key + " " + tag);
    return input ? input.value : "";
  };
  const make = (tag, className, text) => {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text) e.textContent = text;
    return e;
  };
  // Results drawn by Streamlit are hidden while a new one streams in, by a rule of this script's own
  // (the page's elements belong to React, which would not know of a change made to them).
  const hideResults = (keep) => {
    let style = document.getElementById("quill-hide");
    if (!style) {
      style = make("style");
      style.id = "quill-hide";
      document.head.append(style);
    }
    style.textContent = keep === null ? "" : '[class*="st-key-quill_result_"]'
      + keep.map((k) => ":not(.st-key-quill_result_" + k + ")").join("") + " { display: none; }";
  };
  const post = (path, body, signal) => fetch(path, {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body), signal,
  });
  // if this fails, the generation runs to its end: nothing to undo
  const stop = (anchor) => post(anchor.dataset.stop, {ticket: anchor.dataset.ticket}).catch(() => {});

  // Once the page has been drawn again with this run's results (down to their status lines), the
  // streamed views give way to them. A newer click owns the views by then: it is left alone.
  const handOver = (run, boxes) => {
    const drawn = () => boxes.every((b) => !b.key || document.querySelector(
      ".st-key-quill_result_" + b.side + "_" + b.key
      + ' :is([data-testid="stCaptionContainer"], [data-testid="stAlert"])'));
    const observer = new MutationObserver(() => {
      if (live.run !== run) return observer.disconnect();
      if (!drawn()) return;
      observer.disconnect();
      boxes.forEach((b) => { if (b.anchor.firstChild === b.out) b.anchor.replaceChildren(); });
      hideResults(null);
    });
    observer.observe(document.body, {childList: true, subtree: true});
    setTimeout(() => observer.disconnect(), 30000);
    const sync = document.querySelector(".st-key-quill_sync button");
    if (sync) sync.click();
  };

  // Streamlit's own Generate: for what the route refuses (a bad setting, a page out of date), so the
  // page says what is wrong as it always has.
  const throughStreamlit = (button, boxes) => {
    boxes.forEach((b) => b.anchor.replaceChildren());
    hideResults(null);
    live.bypass = true;
    try { button.click(); } finally { live.bypass = false; }
  };

  const show = (box, m, clicked) => {
    if (m.key) box.key = m.key;
    if (m.html) box.cursor.insertAdjacentHTML("beforebegin", m.html);
    if (!m.end) return;
    box.cursor.remove();
    if (m.error) box.out.after(make("div", "quill-error", m.error));
    if (!m.status) return;
    const line = make("p", "quill-status", m.status);
    box.out.after(line);
    if (m.note) line.after(make("p", "quill-note", m.note));
    // the rate is the user's: from their click to the frame that shows this line
    requestAnimationFrame(() => setTimeout(() => {
      const rate = m.tokens / ((performance.now() - clicked) / 1000);
      (window.quillRates = window.quillRates || {})[box.key] = rate;
      line.textContent = line.textContent.replace(/[0-9]+ tokens\/s$/, Math.round(rate) + " tokens/s");
    }, 0));
  };

  async function generate(button, clicked) {
    const run = ++live.run;
    if (live.controller) live.controller.abort();
    const controller = (live.controller = new AbortController());
    const boxes = anchors().map((anchor) => {
      const out = make("div", "quill-output"), cursor = make("span", "quill-cursor", "\u258c");
      out.append(cursor);
      anchor.replaceChildren(out);
      return {side: anchor.dataset.side, anchor, out, cursor, key: null};
    });
    hideResults([]);
    const sides = {};
    for (const b of boxes) {
      const fields = (sides[b.side] = {model: field("model_" + b.side, "input")});
      fields.stop = field("stop_" + b.side, "textarea");
      for (const name of SAMPLING) fields[name] = field(name + "_" + b.side, "input");
    }
    const anchor = boxes[0].anchor;
    live.streaming = true;
    try {
      const res = await post(anchor.dataset.generate, {
        ticket: anchor.dataset.ticket, prompt: field("prompt", "textarea"), sides,
      }, controller.signal);
      if (!res.ok) {
        if (run === live.run) throughStreamlit(button, boxes);
        return;
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const m = JSON.parse(buffer.slice(0, end));
          buffer = buffer.slice(end + 1);
          const box = boxes.find((b) => b.side === m.side);
          if (!box) continue;
          show(box, m, clicked);
          if (m.key) hideResults(boxes.filter((b) => b.key).map((b) => b.side + "_" + b.key));
          if (m.key && live.stopped === run) stop(anchor);  // Stop came before the generation had begun
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;  // a newer click took over
      const message = "The playground's server did not answer: " + e;
      boxes.forEach((b) => { b.cursor.remove(); b.out.after(make("div", "quill-error", message)); });
      return;
    } finally {
      if (run === live.run) live.streaming = false;
    }
    if (run === live.run) requestAnimationFrame(() => setTimeout(() => handOver(run, boxes), 0));
  }

  document.addEventListener("click", (e) => {
    const target = e.target.closest ? e.target : e.target.parentElement;
    const generateButton = target && target.closest(".st-key-generate button");
    if (generateButton && !live.bypass) {
      window.quillClickAt = e.timeStamp;  // for the status line's rate, either way
      const all = anchors();
      if (all.length && all.every((a) => a.dataset.ready === "1")) {
        e.stopPropagation();  // Streamlit never sees this click
        e.preventDefault();
        generate(generateButton, e.timeStamp);
      }
    } else if (target && target.closest(".st-key-stop button") && live.streaming) {
      e.stopPropagation();
      e.preventDefault();
      live.stopped = live.run;
      const anchor = anchors()[0];
      if (anchor) stop(anchor);
    }
  }, true);
})();
