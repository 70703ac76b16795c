/* Darkroom browser UI — the queue panel: every job on the server, from this tab, another tab or an
 * API client (GET /api/queue, kept fresh by the event stream's `job` and `queue` events that jobs.js
 * forwards), with Cancel for a waiting job and Interrupt / Skip for the running one.
 * Someone else's private job is listed as the server lists it to us: its progress, never its prompt.
 * Loaded (defer) after jobs.js; uses window.Darkroom.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, showError } = DR;

  const Q = { jobs: new Map(), order: [], counts: null, seq: 0, timer: null };
  const ACTIVE = new Set(['queued', 'running']);

  /** Where a job came from, as the server knows it (Job.source plus whether it is this tab's). */
  function sourceLabel(j) {
    if (j.mine) return 'this tab';
    return { ui: 'another tab', a1111: 'A1111 API', openai: 'OpenAI API', cli: 'CLI' }[j.source] || 'API client';
  }

  /** One line for a job's stage: queued, loading model, sampling (step k/n, image i of n), decoding,
   *  stopping…, stopped, done, failed (the message). */
  function stageText(j) {
    const stage = j.stage || j.state;
    const total = j.images_total || 1;
    switch (stage) {
      case 'queued': return j.position > 0 ? `Queued · position ${j.position}` : 'Queued';
      case 'loading': return 'Loading model…';
      case 'sampling': {
        const img = Math.min(total, (j.images_done || 0) + 1);
        const parts = [`${j.phase === 'hires' ? 'Hires pass: step' : 'Step'} ${j.step} / ${j.steps}`];
        if (total > 1) parts.push(`image ${img} of ${total}`);
        if (j.eta !== null && j.eta !== undefined) parts.push(`ETA ${DR.fmtSecs(j.eta)}`);
        return parts.join(' · ');
      }
      case 'decoding': return 'Decoding…';
      case 'stopping': return 'Stopping…';
      case 'stopped': return `Stopped · ${j.images_done || 0} image${j.images_done === 1 ? '' : 's'} kept`;
      case 'done': return `Done · ${j.images_done || 0} image${j.images_done === 1 ? '' : 's'}`;
      case 'failed': return `Failed: ${j.error || 'generation failed'}`;
      default: return stage;
    }
  }

  async function refresh() {
    const seq = ++Q.seq;
    try {
      const data = await api(`/api/queue?client=${encodeURIComponent(DR.clientId)}`);
      if (seq !== Q.seq) return;
      Q.jobs = new Map((data.jobs || []).map((j) => [j.id, j]));
      Q.order = (data.jobs || []).map((j) => j.id);
      render();
    } catch (e) {
      if (e.status !== 0) showError(e);
    }
  }
  /** Re-list soon (positions move when a job starts or ends); one request for a burst of events. */
  function refreshSoon() {
    clearTimeout(Q.timer);
    Q.timer = setTimeout(refresh, 120);
  }

  /** A `job` event: update the row in place; a job not listed yet (or one that started or ended)
   *  re-lists the queue. */
  function onJob(j) {
    const old = Q.jobs.get(j.id);
    Q.jobs.set(j.id, j);
    if (!old) Q.order.push(j.id);
    if (!old || old.state !== j.state) refreshSoon();
    render();
  }
  function onQueue(q) {
    if (!q) return;
    const key = `${q.pending}/${q.running}`;
    if (key !== Q.counts) { Q.counts = key; refreshSoon(); }
  }

  async function act(path, btn, fallback) {
    btn.disabled = true;
    try {
      const res = await api(path, { method: 'POST', headers: { 'X-Darkroom-Client': DR.clientId } });
      if (res && res.id) onJob(res);
      if (fallback) fallback(res);
    } catch (e) {
      showError(e);
      btn.disabled = false;
    }
    refreshSoon();
  }

  function row(j) {
    const active = ACTIVE.has(j.state);
    const prompt = j.request ? (j.request.prompt || '(no prompt)') : 'Private job';
    const bar = el('progress', { max: 1, className: 'queue-bar' });
    if (j.state === 'queued' || j.stage === 'loading') bar.removeAttribute('value');
    else bar.value = Math.min(1, Math.max(0, j.progress || 0));
    const buttons = [];
    if (j.state === 'queued') {
      const b = el('button', { type: 'button', className: 'btn btn-small queue-cancel', textContent: 'Cancel' });
      b.addEventListener('click', () => act(`/api/queue/${encodeURIComponent(j.id)}/cancel`, b));
      buttons.push(b);
    } else if (j.state === 'running' && j.stage !== 'stopping') {
      const stop = el('button', { type: 'button', className: 'btn btn-small queue-interrupt', textContent: 'Interrupt' });
      stop.addEventListener('click', () => act(`/api/queue/${encodeURIComponent(j.id)}/cancel`, stop));
      buttons.push(stop);
      if ((j.batches || 1) > 1 || (j.images_total || 1) > 1) {
        const skip = el('button', { type: 'button', className: 'btn btn-small queue-skip', textContent: 'Skip' });
        skip.title = 'Abandon the current image and go on with the next one';
        skip.addEventListener('click', () => act('/api/skip', skip));
        buttons.push(skip);
      }
    }
    const li = el('li', { className: `queue-row stage-${j.stage || j.state}${j.mine ? ' mine' : ''}` },
      el('div', { className: 'queue-head' },
        el('span', { className: 'queue-source badge', textContent: sourceLabel(j) }),
        el('span', { className: 'queue-prompt' + (j.request ? '' : ' muted'), textContent: prompt, title: j.request ? prompt : '' })),
      active ? bar : null,
      el('div', { className: 'queue-foot' },
        el('span', { className: 'queue-stage' + (j.stage === 'failed' ? ' error-text' : ''), textContent: stageText(j) }),
        el('span', { className: 'queue-actions' }, ...buttons)));
    li.dataset.job = j.id;
    li.dataset.stage = j.stage || j.state;
    return li;
  }

  function render() {
    const list = Q.order.map((id) => Q.jobs.get(id)).filter(Boolean);
    const act = list.filter((j) => ACTIVE.has(j.state));
    // running first, then waiting by position, then the ones that ended (as the server listed them)
    act.sort((a, b) => (a.position || 0) - (b.position || 0));
    const ended = list.filter((j) => !ACTIVE.has(j.state)).slice(0, 5);
    const panel = $('queue-panel');
    panel.hidden = !list.length;
    $('queue-summary').textContent = act.length
      ? `Queue · ${act.filter((j) => j.state === 'running').length} running · ${act.filter((j) => j.state === 'queued').length} waiting`
      : 'Queue · empty';
    $('queue-list').replaceChildren(...act.map(row), ...ended.map(row));
    DR.runningJob = act.find((j) => j.state === 'running') || null;
    if (DR.onQueueChange) DR.onQueueChange();
  }

  Object.assign(DR, { queueJob: onJob, queueCounts: onQueue, refreshQueue: refresh, stageText, sourceLabel });
})();
