/* Darkroom browser UI — Generate page jobs: submit, live progress (event stream
 * with a polling fallback), interrupt and results.
 * Loaded (defer) after app.js, whose helpers it uses via window.Darkroom; app.js's
 * init calls DR.refreshStatus() and DR.startJobs() once the lists are loaded.
 */
'use strict';

(() => {
  const DR = window.Darkroom;
  const { $, el, api, ApiError, parseJSON, setOnline, showError, readForm, saveForm, showNotes, state } = DR;
  const LAST_JOB_KEY = 'darkroom.lastJob';
  const CLIENT_KEY = 'darkroom.client';
  /** This tab's id: sent with each job and with the event stream, so that the server shows this
   *  tab its own private jobs in full and everyone else only their progress. */
  const CLIENT_ID = (() => {
    try {
      const known = sessionStorage.getItem(CLIENT_KEY);
      if (known) return known;
    } catch (e) { /* storage off: a fresh id per page */ }
    const bytes = crypto.getRandomValues(new Uint8Array(16)); // also in plain-http LAN pages
    const id = [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
    try { sessionStorage.setItem(CLIENT_KEY, id); } catch (e) { /* as above */ }
    return id;
  })();
  const TERMINAL = new Set(['done', 'error', 'interrupted']);
  DR.clientId = CLIENT_ID;

  // ------------------------------------------------------------------ jobs

  const jobs = new Map(); // id -> {job, seen: ms of last update, polling: bool, t0: ms}
  let lastShown = null;   // id of the job whose progress is on screen
  let es = null;          // EventSource
  let pollTimer = null;

  const isActive = (j) => !TERMINAL.has(j.state);
  const activeJobs = () => [...jobs.values()].filter((t) => isActive(t.job));

  /** The job the progress area follows: running first, then the oldest queued, else the latest. */
  function focusJob() {
    const act = activeJobs();
    const t = act.find((x) => x.job.state === 'running') || act[0] || (lastShown && jobs.get(lastShown));
    return t || null;
  }

  let formError = null; // the form's last complaint: its toast goes once the form is fixed

  async function generate() {
    saveForm();
    showNotes([]);
    const btn = $('generate');
    btn.disabled = true; // guard against a double click; re-enabled right after the POST
    let req;
    try {
      req = readForm(true); // may throw (img2img without an image, X/Y without values)
    } catch (e) {
      formError = e.message;
      showError(e);
      btn.disabled = false;
      return;
    }
    if (formError) { DR.clearToast(formError); formError = null; }
    try {
      const res = await api('/api/jobs', { method: 'POST', json: req, headers: { 'X-Darkroom-Client': CLIENT_ID } });
      const job = res && res.job ? res.job : res;
      if (!job || !job.id) throw new ApiError('server returned no job', 0);
      track(job, false, req.init_image ? { image: req.init_image, mask: req.mask || null } : null);
      if (DR.rememberPrompt) DR.rememberPrompt(req); // prompt history (prompt-history.js); never a private job's
      // On a phone the progress and results are below the long form: bring them into view.
      // (.following gives the output column a window's height, so the progress can reach the top.)
      if (window.matchMedia('(max-width: 899px)').matches) {
        $('progress').parentElement.classList.add('following');
        const still = window.matchMedia('(prefers-reduced-motion: reduce)').matches;
        $('progress').scrollIntoView({ behavior: still ? 'auto' : 'smooth', block: 'start' });
      }
    } catch (e) {
      showError(e);
      // refused: the progress card says so, instead of still showing an older job
      if (!activeJobs().length) {
        lastShown = null;
        $('progress-bar').value = 0;
        $('progress').classList.remove('busy');
        $('progress-text').textContent = `Not started: ${e.message}`;
      }
    } finally {
      btn.disabled = false;
    }
  }

  function track(job, resumed = false, init = null) {
    // t0 (submit time) is unknown for a job resumed after a reload.
    jobs.set(job.id, { job, seen: Date.now(), polling: false, t0: resumed ? null : Date.now(), finished: false, init });
    lastShown = job.id;
    try { sessionStorage.setItem(LAST_JOB_KEY, job.id); } catch (e) { /* ignore */ }
    const note = $('results').querySelector('.results-note'); // about an earlier job
    if (note) note.remove();
    update(job);
    ensurePolling();
  }

  /** Apply a JobState from SSE or polling. Jobs we did not submit only refresh history/queue. */
  function update(job) {
    if (DR.queueJob) DR.queueJob(job);
    const t = jobs.get(job.id);
    if (!t) {
      if (job.state === 'done' && DR.onJobFinished) DR.onJobFinished(job);
      renderProgress(); // another tab's or an API client's job: shown while this tab has none
      return;
    }
    if (t.stopping && job.state === 'running' && job.stage !== 'stopping') job.stage = 'stopping';
    t.job = job;
    t.seen = Date.now();
    if (TERMINAL.has(job.state) && !t.finished) {
      t.finished = true;
      finish(t);
    }
    renderProgress();
  }

  function finish(t) {
    const job = t.job;
    const imgs = job.images || [];
    if (imgs.length) state.lastSeed = imgs[imgs.length - 1].seed;
    if (job.state === 'error') showError(new Error(job.error || 'generation failed'));
    if (imgs.length || job.state !== 'error') DR.viewer.show(job, { init: t.init });
    else DR.viewer.endLive();
    lastShown = job.id;
    // Forget older finished jobs; keep the one on screen.
    for (const [id, x] of jobs) if (x.finished && id !== job.id) jobs.delete(id);
    if (DR.onJobFinished) DR.onJobFinished(job);
  }

  const fmtSecs = (s) => (s >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.max(0, Math.round(s))} s`);
  DR.fmtSecs = fmtSecs;

  /** The running job of another tab or an API client (from the queue panel), when this tab has none. */
  const foreignJob = () => (activeJobs().length ? null : DR.runningJob || null);

  function renderProgress() {
    const own = focusJob();
    const foreign = foreignJob();
    const bar = $('progress-bar'), text = $('progress-text'), preview = $('preview');
    $('interrupt').disabled = !activeJobs().length && !foreign;
    if (!own && !foreign) return;
    if (!own || (foreign && !isActive(own.job))) { // someone else's job: its progress, no preview
      const j = foreign;
      $('progress').classList.add('busy');
      if (j.state === 'running' && j.progress) bar.value = j.progress; else bar.removeAttribute('value');
      text.textContent = `${DR.sourceLabel(j) === 'another tab' ? 'Another tab' : DR.sourceLabel(j)}: ${DR.stageText(j)}`;
      return;
    }
    const t = own;
    const j = t.job;
    const others = activeJobs().length - (isActive(j) ? 1 : 0);
    const more = others > 0 ? ` · ${others} more of yours queued` : '';
    $('progress').classList.toggle('busy', isActive(j));
    if (j.state === 'queued') {
      bar.removeAttribute('value'); // indeterminate
      text.textContent = (j.position > 0 ? `Queued · position ${j.position}` : 'Starting…') + more;
    } else if (j.state === 'running') {
      const stage = j.stage || 'sampling';
      if (stage === 'loading') bar.removeAttribute('value');
      else bar.value = Math.min(1, Math.max(0, j.progress || 0));
      if (stage === 'sampling') {
        const perBatch = j.request && j.request.batch_size > 1;
        const parts = [j.steps ? `${j.phase === 'hires' ? 'Hires pass: step' : 'Step'} ${j.step} / ${j.steps}` : 'Preparing…'];
        if (perBatch && j.batches > 1) parts.push(`batch ${(j.batch || 0) + 1} of ${j.batches}`);
        else if (!perBatch) parts.push(`image ${Math.min(j.images_total || 1, (j.images_done || 0) + 1)} of ${j.images_total || 1}`);
        if (j.eta !== null && j.eta !== undefined) parts.push(`ETA ${fmtSecs(j.eta)}`);
        text.textContent = parts.join(' · ') + more;
      } else {
        text.textContent = DR.stageText(j) + more; // Loading model…, Decoding…, Stopping…
      }
    } else {
      bar.value = j.state === 'done' ? 1 : bar.value || 0;
      const n = (j.images || []).length;
      const took = t.t0 ? ` in ${((t.seen - t.t0) / 1000).toFixed(1)} s` : '';
      text.textContent =
        j.state === 'done' ? `Done · ${n} image${n === 1 ? '' : 's'}${took}` + more
        : j.state === 'interrupted' ? `Interrupted · ${n} image${n === 1 ? '' : 's'} kept` + more
        : `Error: ${j.error || 'generation failed'}` + more;
    }
    // Live preview while sampling, where the result will appear; only touch src when the server has a new one.
    if (isActive(j) && j.preview_url) {
      DR.viewer.live(j);
      if (preview.dataset.src !== j.preview_url) { preview.dataset.src = j.preview_url; preview.src = j.preview_url; }
      preview.hidden = false;
    } else if (!isActive(j)) {
      preview.hidden = true;
      preview.dataset.src = '';
    }
  }

  /** Interrupt this tab's job, or else the job running for another tab or an API client. */
  async function interrupt() {
    const t = focusJob();
    const foreign = foreignJob();
    if ((!t || !isActive(t.job)) && !foreign) return;
    $('interrupt').disabled = true;
    try {
      if (t && isActive(t.job)) {
        t.stopping = true; // "Stopping…" until the server says it stopped
        if (t.job.state === 'running') { t.job.stage = 'stopping'; renderProgress(); $('interrupt').disabled = true; }
        update(await api(`/api/jobs/${encodeURIComponent(t.job.id)}/interrupt`, { method: 'POST' }));
      } else {
        const res = await api(`/api/queue/${encodeURIComponent(foreign.id)}/cancel`, { method: 'POST', headers: { 'X-Darkroom-Client': CLIENT_ID } });
        update(res);
      }
    } catch (e) {
      showError(e);
      renderProgress();
    }
  }

  async function pollJob(t) {
    if (t.polling) return;
    t.polling = true;
    try {
      update(await api(`/api/jobs/${encodeURIComponent(t.job.id)}`));
    } catch (e) {
      if (e.status === 404) { // the server forgot it (restart): stop following it
        jobs.delete(t.job.id);
        $('progress-text').textContent = 'The job is no longer known to the server.';
        $('progress').classList.remove('busy');
        renderProgress();
      } else if (e.status !== 0) showError(e); // unreachable is already shown once
    } finally {
      t.polling = false;
    }
  }

  /* Fallback for SSE: while one of our jobs is active, poll it every 500 ms if
   * the event stream is down, or if it has been quiet for 3 s (missed events). */
  function ensurePolling() {
    if (pollTimer) return;
    pollTimer = setInterval(() => {
      const act = activeJobs();
      if (!act.length) { clearInterval(pollTimer); pollTimer = null; return; }
      const live = es && es.readyState === 1;
      const now = Date.now();
      for (const t of act) if (!live || now - t.seen > 3000) pollJob(t);
    }, 500);
  }

  function renderQueue(q) {
    if (!q) return;
    if (DR.queueCounts) DR.queueCounts(q);
    const n = q.pending || 0;
    const parts = [];
    if (n) parts.push(`${n} job${n === 1 ? '' : 's'} waiting`);
    if (q.running) parts.push('1 running');
    $('queue-info').textContent = parts.length ? parts.join(' · ') : 'Queue empty';
  }

  function connectEvents() {
    if (!window.EventSource) return; // polling covers it
    es = new EventSource(`/api/events?client=${encodeURIComponent(CLIENT_ID)}`);
    const parse = (e) => { try { return parseJSON(e.data); } catch (err) { return null; } };
    es.addEventListener('open', () => {
      setOnline(true);
      if (DR.refreshQueue) DR.refreshQueue();
      for (const t of activeJobs()) pollJob(t); // catch up on anything missed while away
    });
    es.addEventListener('job', (e) => { const j = parse(e); if (j && j.id) update(j); });
    es.addEventListener('queue', (e) => renderQueue(parse(e)));
    es.addEventListener('error', () => {
      // CONNECTING: the browser retries on its own. CLOSED (bad status/type): retry ourselves.
      if (es && es.readyState === 2) {
        es = null;
        setTimeout(connectEvents, 5000);
      }
      refreshStatus();
    });
  }

  async function refreshStatus() {
    try {
      const s = await api('/api/status');
      $('server-status').textContent = [s.version && `v${s.version}`, s.device, s.precision].filter(Boolean).join(' · ') || 'connected';
      renderQueue(s.queue);
    } catch (e) {
      if (e.status !== 0) showError(e);
    }
  }

  /** Resume the job this tab last submitted (survives a reload while it runs). */
  async function resumeLastJob() {
    let id = null;
    try { id = sessionStorage.getItem(LAST_JOB_KEY); } catch (e) { return; }
    if (!id) return;
    try {
      const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
      if (job && job.id) track(job, true);
    } catch (e) { /* gone: nothing to resume */ }
  }

  // ------------------------------------------------------------------ wiring

  $('gen-form').addEventListener('submit', (e) => { e.preventDefault(); generate(); });
  for (const id of ['prompt', 'negative']) {
    $(id).addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    });
  }
  $('interrupt').addEventListener('click', interrupt);

  /** Called by app.js's init once models, samplers and schedules are loaded. */
  function startJobs() {
    DR.onQueueChange = renderProgress; // the queue panel (queue.js) knows about other tabs' jobs
    if (DR.refreshQueue) DR.refreshQueue();
    connectEvents();
    // While the event stream is down, keep the queue line and status fresh.
    setInterval(() => { if (!es || es.readyState !== 1) refreshStatus(); }, 5000);
    resumeLastJob();
  }

  /** Esc (a11y.js): interrupt this tab's own running job, if it has one; true if it did. */
  function interruptOwn() {
    const t = focusJob();
    if (!t || !isActive(t.job)) return false;
    interrupt();
    return true;
  }

  Object.assign(DR, { refreshStatus, startJobs, interruptOwn });
})();
