/* Darkroom browser UI — prompt tools: a token counter under the prompt and the negative prompt
 * (tokens and 75-token chunks as the webui counts them, from POST /api/tokens, debounced), and
 * Ctrl+Up / Ctrl+Down to weight the selection or the word at the caret by 0.1, as the webui's
 * edit-attention does: "word" -> "(word:1.1)" -> "(word:1.2)", back to plain "word" at 1.0.
 */
'use strict';

(() => {
  const DR = (window.Darkroom = window.Darkroom || {});
  const $ = (id) => document.getElementById(id);
  const DELIMITERS = '.,\\/!?%^*;:{}=`~() \r\n\t';
  const DEBOUNCE_MS = 300;

  // ------------------------------------------------------------------ token counter

  function counter(id) {
    const box = $(id);
    const out = DR.el('div', { className: 'token-count', id: `${id}-tokens`, textContent: '0/75',
      title: 'Tokens / what the chunks hold: the text encoder reads 75 tokens at a time; BREAK starts a new chunk' });
    box.closest('label').after(out);
    const described = (box.getAttribute('aria-describedby') || '').split(/\s+/).filter(Boolean);
    box.setAttribute('aria-describedby', [...described, out.id].join(' '));
    let timer = null;
    let seq = 0;
    async function update() {
      const mine = ++seq;
      const steps = parseInt($('steps').value, 10) || 20;
      try {
        const r = await DR.api('/api/tokens', { method: 'POST', json: { text: box.value, steps } });
        if (mine !== seq) return; // a newer request is on its way
        out.textContent = `${r.tokens}/${r.limit}` + (r.chunks > 1 ? ` · ${r.chunks} chunks` : '');
        out.classList.toggle('over', r.chunks > 1);
      } catch (e) { /* the counter is a hint: stay quiet (the status line shows a dead server) */ }
    }
    const soon = () => { clearTimeout(timer); timer = setTimeout(update, DEBOUNCE_MS); };
    box.addEventListener('input', soon);
    return soon;
  }

  // ------------------------------------------------------------------ Ctrl+Up / Ctrl+Down

  /** With no selection, select the "(text:w)" block around the caret, else the word at the caret. */
  function selectTarget(ta) {
    const v = ta.value;
    let s = ta.selectionStart;
    let e = ta.selectionEnd;
    if (s !== e) return true;
    const open = v.lastIndexOf('(', s - 1);
    const close = v.indexOf(')', s);
    if (open !== -1 && close !== -1 && !/[()]/.test(v.slice(open + 1, close))) {
      const m = /^(.*):-?[\d.]+$/s.exec(v.slice(open + 1, close));
      if (m) { ta.setSelectionRange(open + 1, open + 1 + m[1].length); return true; }
    }
    while (s > 0 && !DELIMITERS.includes(v[s - 1])) s -= 1;
    while (e < v.length && !DELIMITERS.includes(v[e])) e += 1;
    if (s === e) return false;
    ta.setSelectionRange(s, e);
    return true;
  }

  /** Weight the selection of `ta` by `delta` (+0.1 or -0.1). */
  function editAttention(ta, delta) {
    if (!selectTarget(ta)) return;
    const v = ta.value;
    const s = ta.selectionStart;
    const e = ta.selectionEnd;
    const sel = v.slice(s, e);
    const after = /^:(-?\d*\.?\d+)\)/.exec(v.slice(e));
    let start;
    if (v[s - 1] === '(' && after) { // already weighted: change it
      const w = Math.round((parseFloat(after[1]) + delta) * 10) / 10;
      const end = e + after[0].length;
      if (w === 1) { start = s - 1; ta.value = v.slice(0, s - 1) + sel + v.slice(end); } // back to plain text
      else { start = s; ta.value = `${v.slice(0, s)}${sel}:${w})${v.slice(end)}`; }
    } else {
      const w = Math.round((1 + delta) * 10) / 10;
      start = s + 1;
      ta.value = `${v.slice(0, s)}(${sel}:${w})${v.slice(e)}`;
    }
    ta.setSelectionRange(start, start + sel.length);
    ta.dispatchEvent(new Event('input', { bubbles: true })); // saves the form, updates the counter
  }

  document.addEventListener('DOMContentLoaded', () => {
    const all = [];
    for (const id of ['prompt', 'negative']) {
      const ta = $(id);
      const soon = counter(id);
      all.push(soon);
      ta.addEventListener('keydown', (e) => {
        if (!(e.ctrlKey || e.metaKey) || (e.key !== 'ArrowUp' && e.key !== 'ArrowDown')) return;
        e.preventDefault();
        editAttention(ta, e.key === 'ArrowUp' ? 0.1 : -0.1);
      });
      ta.addEventListener('change', soon);
      ta.addEventListener('focus', () => all.forEach((f) => f())); // "Use settings" fills both, then focuses the prompt
      $('steps').addEventListener('change', soon); // schedules such as [a:b:10] depend on the steps
      soon();
    }
  });
})();
