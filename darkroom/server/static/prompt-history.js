/* Darkroom browser UI — prompt history: the prompts (and negative prompts) this browser generated
 * with, most recent first, without repeats, kept in localStorage (at most MAX). A private job is
 * never recorded. Opened by the "History" button over the prompt or Alt+Down in a prompt box: a
 * dialog with a filter box (a combobox over the list: Up/Down choose, Enter uses the prompt,
 * Shift+Delete forgets one) and a button that clears it all.
 */
'use strict';

(() => {
  const DR = (window.Darkroom = window.Darkroom || {});
  const $ = (id) => document.getElementById(id);
  const KEY = 'darkroom.promptHistory';
  const MAX = 100;
  const S = { shown: [], active: -1, opener: null };

  function load() {
    try {
      const list = JSON.parse(localStorage.getItem(KEY) || '[]');
      return Array.isArray(list) ? list.filter((e) => e && typeof e.prompt === 'string') : [];
    } catch (e) { return []; } // storage off or a damaged value: an empty history, never an error
  }
  function save(list) {
    try { localStorage.setItem(KEY, JSON.stringify(list.slice(0, MAX))); } catch (e) { /* full or off */ }
  }
  const same = (a, b) => a.prompt === b.prompt && (a.negative_prompt || '') === (b.negative_prompt || '');

  /** Called by jobs.js when the server accepted a job: record its prompts unless the job is private. */
  function remember(req) {
    if (!req || req.private) return;
    const entry = { prompt: String(req.prompt || ''), negative_prompt: String(req.negative_prompt || ''), at: Date.now() };
    if (!entry.prompt.trim() && !entry.negative_prompt.trim()) return;
    save([entry, ...load().filter((e) => !same(e, entry))]);
  }

  // ------------------------------------------------------------------ the dialog

  function build() {
    const { el } = DR;
    const filter = el('input', { type: 'search', id: 'ph-filter', placeholder: 'Filter prompts…', autocomplete: 'off',
      role: 'combobox', 'aria-label': 'Filter prompts', 'aria-expanded': 'true', 'aria-controls': 'ph-list',
      'aria-autocomplete': 'list', 'aria-describedby': 'ph-keys' });
    const dialog = el('div', { className: 'modal', id: 'prompt-history', role: 'dialog', 'aria-modal': 'true',
      'aria-labelledby': 'ph-title', hidden: true },
    el('div', { className: 'modal-card ph-card' },
      el('div', { className: 'modal-head' },
        el('h2', { id: 'ph-title', textContent: 'Prompt history' }),
        el('button', { type: 'button', className: 'btn btn-icon', id: 'ph-close', 'aria-label': 'Close', textContent: '✕' })),
      filter,
      el('p', { className: 'muted hint-text', id: 'ph-keys',
        textContent: '↑ ↓ choose · Enter uses it · Shift+Delete forgets it. Private jobs are never recorded.' }),
      el('ul', { className: 'ph-list', id: 'ph-list', role: 'listbox', 'aria-label': 'Prompts you generated with, most recent first' }),
      el('p', { className: 'muted', id: 'ph-empty', hidden: true }),
      el('div', { className: 'actions' },
        el('button', { type: 'button', className: 'btn btn-danger', id: 'ph-clear', textContent: 'Clear history' }))));
    document.body.append(dialog);
    $('ph-close').addEventListener('click', close);
    dialog.addEventListener('click', (e) => { if (e.target === dialog) close(); });
    filter.addEventListener('input', render);
    filter.addEventListener('keydown', onKey);
    $('ph-list').addEventListener('click', (e) => {
      const li = e.target.closest('[role=option]');
      if (li) use(S.shown[Number(li.dataset.index)]);
    });
    $('ph-clear').addEventListener('click', () => {
      save([]);
      render();
      DR.toast('Prompt history cleared');
      filter.focus();
    });
  }

  function render() {
    const words = $('ph-filter').value.toLowerCase().split(/\s+/).filter(Boolean);
    const all = load();
    S.shown = all.filter((e) => words.every((w) => `${e.prompt}\n${e.negative_prompt || ''}`.toLowerCase().includes(w)));
    S.active = S.shown.length ? 0 : -1;
    $('ph-list').replaceChildren(...S.shown.map((e, i) => DR.el('li', { role: 'option', id: `ph-opt-${i}`,
      className: 'ph-item', 'data-index': String(i) },
    DR.el('span', { className: 'ph-prompt', textContent: e.prompt || '(empty prompt)' }),
    e.negative_prompt ? DR.el('span', { className: 'ph-negative muted', textContent: `Negative: ${e.negative_prompt}` }) : null)));
    const empty = $('ph-empty');
    empty.hidden = S.shown.length > 0;
    empty.textContent = all.length ? 'No prompt matches the filter.' : 'No prompts yet: the prompts you generate with appear here.';
    $('ph-list').hidden = !S.shown.length;
    $('ph-clear').disabled = !all.length;
    mark();
  }

  /** Show which option is active (aria-activedescendant: the focus stays in the filter box). */
  function mark() {
    const opts = [...$('ph-list').children];
    opts.forEach((li, i) => li.setAttribute('aria-selected', String(i === S.active)));
    const cur = opts[S.active];
    if (cur) {
      $('ph-filter').setAttribute('aria-activedescendant', cur.id);
      cur.scrollIntoView({ block: 'nearest' });
    } else {
      $('ph-filter').removeAttribute('aria-activedescendant');
    }
  }

  function onKey(e) {
    const n = S.shown.length;
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      if (n) { S.active = (S.active + (e.key === 'ArrowDown' ? 1 : -1) + n) % n; mark(); }
    } else if (e.key === 'Enter') {
      e.preventDefault();
      if (S.active >= 0) use(S.shown[S.active]);
    } else if (e.key === 'Delete' && e.shiftKey && S.active >= 0) {
      e.preventDefault();
      const gone = S.shown[S.active];
      save(load().filter((x) => !same(x, gone)));
      const keep = S.active;
      render();
      S.active = Math.min(keep, S.shown.length - 1);
      mark();
    } else if (e.key === 'Escape') {
      e.preventDefault();
      close();
    }
  }

  function open() {
    if (!$('prompt-history')) build();
    const d = $('prompt-history');
    if (!d.hidden) return;
    S.opener = document.activeElement;
    $('ph-filter').value = '';
    render();
    d.hidden = false;
    document.body.classList.add('modal-open');
    $('ph-filter').focus();
  }

  function close(refocus = true) {
    const d = $('prompt-history');
    if (!d || d.hidden) return;
    d.hidden = true;
    document.body.classList.remove('modal-open');
    if (refocus && S.opener && S.opener.isConnected && S.opener.focus) S.opener.focus();
  }

  function use(entry) {
    if (!entry) return;
    close(false);
    for (const [id, value] of [['prompt', entry.prompt], ['negative', entry.negative_prompt || '']]) {
      $(id).value = value;
      $(id).dispatchEvent(new Event('input', { bubbles: true })); // saves the form, updates the token counter
    }
    $('prompt').focus();
    DR.toast('Prompt from history');
  }

  /** A "History" button in the prompt's label row. The label wrapping the prompt becomes <label for>, so
   *  the button is not part of the prompt box's name (as help.js does). */
  function addButton() {
    const box = $('prompt');
    const wrap = box.closest('label.field');
    const btn = DR.el('button', { type: 'button', className: 'btn btn-small ph-open', id: 'prompt-history-open',
      textContent: 'History', title: 'Prompt history (Alt+↓ in a prompt box)', 'aria-haspopup': 'dialog' });
    btn.setAttribute('aria-label', 'Prompt history');
    btn.addEventListener('click', open);
    if (!wrap) { box.before(btn); return; }
    const div = DR.el('div', { className: wrap.className });
    div.append(...wrap.childNodes);
    wrap.replaceWith(div);
    const span = div.querySelector(':scope > .label');
    const label = DR.el('label', { className: 'label', htmlFor: 'prompt' });
    label.append(...span.childNodes);
    const row = DR.el('div', { className: 'label-row' }, label, btn);
    span.replaceWith(row);
  }

  document.addEventListener('DOMContentLoaded', () => {
    addButton();
    for (const id of ['prompt', 'negative']) {
      $(id).addEventListener('keydown', (e) => {
        if (e.altKey && e.key === 'ArrowDown' && !e.ctrlKey && !e.metaKey) { e.preventDefault(); open(); }
      });
    }
  });
  Object.assign(DR, { rememberPrompt: remember, openPromptHistory: open, closePromptHistory: close, promptHistory: load });
})();
