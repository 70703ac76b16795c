/* Darkroom browser UI — keyboard and accessibility: the tab bar's arrow keys (roving tabindex),
 * focus kept inside an open modal dialog, the shortcut list dialog ("?" or the header button),
 * Esc to interrupt this tab's running job, and the theme switch (dark, light, follow the system).
 */
'use strict';

(() => {
  const DR = (window.Darkroom = window.Darkroom || {});
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ theme (applied at once: no flash)

  const THEME_KEY = 'darkroom.theme';
  const systemLight = window.matchMedia('(prefers-color-scheme: light)');
  let themeChoice = 'system';
  /** 'system' follows prefers-color-scheme; <html data-theme> is always the resolved 'dark' or 'light'. */
  function applyTheme(value) {
    themeChoice = ['light', 'dark'].includes(value) ? value : 'system';
    const resolved = themeChoice === 'system' ? (systemLight.matches ? 'light' : 'dark') : themeChoice;
    document.documentElement.dataset.theme = resolved;
    return themeChoice;
  }
  systemLight.addEventListener('change', () => applyTheme(themeChoice));
  let savedTheme = null;
  try { savedTheme = localStorage.getItem(THEME_KEY); } catch (e) { /* storage off */ }
  applyTheme(savedTheme);

  // ------------------------------------------------------------------ tab bar

  function tabs() { return [...document.querySelectorAll('.tabs [role=tab]')]; }

  // Going to #generate (etc.) moves the focus to the fragment's target or the viewport: a tab chosen
  // from the keyboard gets it back once the route has run (hashchange comes after that move).
  let refocusTab = false;

  /** Called by app.js's route(): only the selected tab is in the Tab order. */
  function syncTabs() {
    for (const t of tabs()) {
      const selected = t.getAttribute('aria-selected') === 'true';
      t.tabIndex = selected ? 0 : -1;
      if (selected && refocusTab) t.focus();
    }
    refocusTab = false;
  }

  function onTabKey(e) {
    const list = tabs();
    const i = list.indexOf(e.target);
    if (i < 0) return;
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: list.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    const tab = list[(to + list.length) % list.length];
    tab.focus();
    refocusTab = true;
    DR.showPage(tab.dataset.page);
  }

  // ------------------------------------------------------------------ modal dialogs

  const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]):not([type=hidden]), select:not([disabled]), '
    + 'textarea:not([disabled]), [tabindex]:not([tabindex="-1"])';

  /** The open modal dialog on top (the lightbox opens over History's detail). */
  function topDialog() {
    const open = [...document.querySelectorAll('[role=dialog][aria-modal=true]')].filter((d) => !d.hidden);
    return open.find((d) => d.id === 'lightbox') || open[open.length - 1] || null;
  }

  function trapTab(e) {
    const dialog = topDialog();
    if (!dialog) return;
    const items = [...dialog.querySelectorAll(FOCUSABLE)].filter((n) => n.getClientRects().length && !n.closest('[hidden]'));
    if (!items.length) { e.preventDefault(); return; }
    const first = items[0];
    const last = items[items.length - 1];
    const inside = dialog.contains(document.activeElement);
    if (e.shiftKey && (!inside || document.activeElement === first)) { e.preventDefault(); last.focus(); }
    else if (!e.shiftKey && (!inside || document.activeElement === last)) { e.preventDefault(); first.focus(); }
  }

  // ------------------------------------------------------------------ shortcut list

  const sc = { opener: null };
  function openShortcuts() {
    const d = $('shortcuts');
    if (!d.hidden) return;
    sc.opener = document.activeElement;
    d.hidden = false;
    document.body.classList.add('modal-open');
    $('shortcuts-close').focus();
  }
  function closeShortcuts() {
    const d = $('shortcuts');
    if (d.hidden) return false;
    d.hidden = true;
    document.body.classList.remove('modal-open');
    if (sc.opener && sc.opener.isConnected && sc.opener.focus) sc.opener.focus();
    return true;
  }

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function onKey(e) {
    if (e.key === 'Tab') { trapTab(e); return; }
    if (e.key === 'Escape' && !$('shortcuts').hidden) { e.preventDefault(); e.stopImmediatePropagation(); closeShortcuts(); return; }
    if (e.key === '?' && !e.ctrlKey && !e.metaKey && !e.altKey && !typing(e.target) && !topDialog()) {
      e.preventDefault();
      openShortcuts();
      return;
    }
    // Esc with no dialog open: interrupt this tab's running job (never another tab's)
    if (e.key === 'Escape' && !topDialog() && DR.interruptOwn && DR.interruptOwn()) e.preventDefault();
  }

  function bind() {
    document.querySelector('.tabs').addEventListener('keydown', onTabKey);
    document.querySelector('.tabs').addEventListener('click', (e) => { if (e.target.closest('[role=tab]') && e.detail === 0) refocusTab = true; });
    $('shortcuts-open').addEventListener('click', openShortcuts);
    $('shortcuts-close').addEventListener('click', closeShortcuts);
    $('shortcuts').addEventListener('click', (e) => { if (e.target === $('shortcuts')) closeShortcuts(); });
    const theme = $('theme');
    theme.value = applyTheme(savedTheme);
    theme.addEventListener('change', () => {
      const v = applyTheme(theme.value);
      try { if (v === 'system') localStorage.removeItem(THEME_KEY); else localStorage.setItem(THEME_KEY, v); } catch (e) { /* storage off */ }
    });
    syncTabs();
  }

  // Window, capture, before viewer.js's lightbox keys (this file loads first): Esc must see whether a
  // dialog was open before any handler closes it, so closing a dialog never interrupts the job too.
  window.addEventListener('keydown', onKey, true);
  Object.assign(DR, { syncTabs, openShortcuts, closeShortcuts });
  document.addEventListener('DOMContentLoaded', bind);
})();
