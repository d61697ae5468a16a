// The reference widget of the recognition service (检查检验结果互认): the badge, the list of
// recognisable reports with downloads, and the forced 互认/不互认 dialog when orders are signed.
//
// Embedded by URL: /widget/?patient_id=&visit_no=&doctor_no=&visit_type=&host_origin=#session=TOKEN
// Talks only to this service (relative ../api/ URLs); the Content-Security-Policy allows
// nothing else. Data from the platform is untrusted: nodes are built with textContent only.
//
// Host API: window.hmrWidget.sign(orders, visitType) and window.hmrWidget.refresh(), or
// postMessage {type: 'hmr:sign', orders, visit_type} from the parent (origin = host_origin).
'use strict';

(function () {
  const REASONS = [
    ['01', '病情变化，原结果难以反映当前病情'],
    ['02', '结果在疾病发展中变化较快'],
    ['03', '手术、输血等重大医疗措施前'],
    ['04', '急诊、急救'],
    ['05', '司法、伤残、病退等鉴定'],
    ['06', '其他情形确需复查'],
  ];
  const OTHER_REASON = '06';
  const TIMEOUT_MS = 20000;

  // ------------------------------------------------------------------ parameters

  const query = new URLSearchParams(window.location.search);
  const params = {
    patient_id: query.get('patient_id') || '',
    visit_no: query.get('visit_no') || '',
    doctor_no: query.get('doctor_no') || '',
    visit_type: query.get('visit_type') || '1',
  };

  /** The session token from `#session=TOKEN` (not URLSearchParams: a '+' stays a '+'). */
  function readSession() {
    const hash = window.location.hash.replace(/^#/, '');
    for (const part of hash.split('&')) {
      const eq = part.indexOf('=');
      if (eq > 0 && part.slice(0, eq) === 'session') {
        try {
          return decodeURIComponent(part.slice(eq + 1));
        } catch (e) {
          return part.slice(eq + 1);
        }
      }
    }
    return '';
  }
  const session = readSession();
  // The token leaves the address bar (and the history) once read.
  if (session && window.history && typeof window.history.replaceState === 'function') {
    window.history.replaceState(null, '', window.location.pathname + window.location.search);
  }

  /** The embedding page's origin (`host_origin`), normalised; '' when absent or invalid. */
  function readHostOrigin() {
    const raw = query.get('host_origin');
    if (!raw) return '';
    try {
      const origin = new URL(raw).origin;
      return origin && origin !== 'null' ? origin : '';
    } catch (e) {
      return '';
    }
  }
  const hostOrigin = readHostOrigin();
  const hasParent = window.parent && window.parent !== window;

  // ------------------------------------------------------------------ helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** `2026-11-30T10:15:00+08:00` → `2026-11-30 10:15` (the text as given, no conversion). */
  function formatTime(value) {
    if (value === undefined || value === null) return '';
    const s = String(value);
    return /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/.test(s) ? s.slice(0, 16).replace('T', ' ') : s;
  }

  /** A platform page address, only when it is http(s). */
  function safeUrl(value) {
    if (typeof value !== 'string' || value === '') return null;
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === 'https:' || url.protocol === 'http:' ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function platformLink(url, text) {
    const a = el('a', 'platform', text);
    a.href = url;
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    return a;
  }

  function kindLabel(type) {
    if (type === 'lab') return '检验';
    if (type === 'exam') return '检查';
    return '';
  }

  class ApiError extends Error {
    constructor(message, sqlstate, status) {
      super(message);
      this.name = 'ApiError';
      this.sqlstate = sqlstate || null;
      this.status = status || 0;
    }
  }

  /** A request to this service; resolves to the Response when 2xx, else rejects with ApiError. */
  async function request(path, options) {
    const opts = options || {};
    const headers = { Accept: opts.accept || 'application/json' };
    if (session) headers.Authorization = 'Session ' + session;
    let body;
    if (opts.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.json);
    }
    const controller = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = controller ? setTimeout(() => controller.abort(), TIMEOUT_MS) : null;
    let response;
    try {
      response = await fetch(path, {
        method: opts.method || 'GET',
        headers,
        body,
        credentials: 'same-origin',
        cache: 'no-store',
        signal: controller ? controller.signal : undefined,
      });
    } catch (e) {
      throw new ApiError(e && e.name === 'AbortError' ? '互认服务响应超时' : '无法连接互认服务');
    } finally {
      if (timer) clearTimeout(timer);
    }
    if (!response.ok) {
      let message = '';
      let sqlstate = null;
      try {
        const answer = await response.json();
        if (answer && typeof answer.error === 'string') message = answer.error;
        if (answer && typeof answer.sqlstate === 'string') sqlstate = answer.sqlstate;
      } catch (e) {
        // not JSON: fall back to the status below
      }
      throw new ApiError(message || '互认服务返回错误（' + response.status + '）', sqlstate, response.status);
    }
    return response;
  }

  async function requestJson(path, options) {
    const response = await request(path, options);
    try {
      return await response.json();
    } catch (e) {
      throw new ApiError('互认服务的应答无法解析');
    }
  }

  function errorText(e) {
    return e && e.message ? e.message : String(e);
  }

  function setStatus(text, kind) {
    const status = $('hmr-status');
    status.textContent = text || '';
    if (kind) status.className = kind;
    else status.removeAttribute('class');
  }

  function post(message) {
    if (!hostOrigin || !hasParent) return;
    try {
      window.parent.postMessage(message, hostOrigin);
    } catch (e) {
      // the parent went away: nothing to tell
    }
  }

  // ------------------------------------------------------------------ badge and list

  let badge = { status: 'loading', count: 0, url: null, items: [] };
  let badgeLoad = null;

  function setListOpen(open) {
    const list = $('hmr-list');
    const button = $('hmr-badge');
    list.hidden = !open;
    button.setAttribute('aria-expanded', open ? 'true' : 'false');
  }

  function renderBadge() {
    const button = $('hmr-badge');
    const count = badge.status === 'ok' ? badge.count : 0;
    button.classList.remove('loading', 'ok', 'none');
    button.disabled = false;
    if (badge.status === 'ok' && count > 0) {
      button.classList.add('ok');
      button.textContent = '可互认 ' + count + ' 项';
    } else if (badge.status === 'ok') {
      button.classList.add('none');
      button.textContent = '无可互认结果';
    } else if (badge.status === 'invalid_patient') {
      button.classList.add('none');
      button.textContent = '患者身份信息需更正';
    } else {
      button.classList.add('none');
      button.textContent = '互认平台暂不可用';
    }
    const toPerform = Array.isArray(badge.to_perform) ? badge.to_perform.length : 0;
    if (toPerform > 0) {
      button.classList.remove('none');
      button.classList.add('warn');
      button.textContent += '，' + toPerform + ' 项需重新检查';
    } else {
      button.classList.remove('warn');
    }
    button.dataset.count = String(count);
    // Grey: not clickable (aria-disabled keeps its look; the click handler opens nothing).
    const opens = badge.status === 'ok' && (count > 0 || toPerform > 0);
    button.setAttribute('aria-disabled', opens ? 'false' : 'true');
    if (!opens) setListOpen(false);
    document.body.dataset.hmrBadge =
      badge.status === 'ok' ? (count > 0 ? 'ok' : 'none') : badge.status === 'invalid_patient' ? 'invalid_patient' : 'unavailable';
  }

  function renderList() {
    const list = $('hmr-items');
    const empty = $('hmr-list-empty');
    const link = $('hmr-list-link');
    list.replaceChildren();
    link.replaceChildren();
    const items = badge.status === 'ok' ? badge.items : [];
    items.forEach((item, i) => list.appendChild(renderItem(item, i)));
    if (items.length === 0) {
      empty.textContent =
        badge.status === 'ok'
          ? '本患者暂无可互认的检查检验结果'
          : badge.status === 'invalid_patient'
            ? '患者身份信息（证件类型或号码）需在 HIS 中更正后才能查询互认结果'
            : '互认平台暂不可用，请稍后再试';
      empty.hidden = false;
    } else {
      empty.hidden = true;
    }
    const url = badge.status === 'ok' ? safeUrl(badge.url) : null;
    if (url) link.appendChild(platformLink(url, '在互认平台查看'));
    link.hidden = !url;
    renderToPerform();
  }

  /** Orders recognised here whose report was revoked at its hospital: to be performed. */
  function renderToPerform() {
    const box = $('hmr-to-perform');
    const list = $('hmr-to-perform-items');
    list.replaceChildren();
    const orders = Array.isArray(badge.to_perform) ? badge.to_perform.filter((o) => o && typeof o === 'object') : [];
    for (const o of orders) {
      const li = el('li', 'to-perform');
      li.dataset.orderId = String(o.order_id);
      li.appendChild(el('span', 'item-name', o.item_name || o.order_id));
      li.appendChild(el('span', 'order', '医嘱 ' + o.order_id));
      li.appendChild(el('span', 'revoked', '原报告撤销于 ' + formatTime(o.revoked_at)));
      list.appendChild(li);
    }
    box.hidden = orders.length === 0;
    document.body.dataset.hmrToPerform = String(orders.length);
  }

  function renderItem(item, index) {
    const li = el('li', 'item');
    const reportId = item && item.report_id !== undefined && item.report_id !== null ? String(item.report_id) : '';
    li.dataset.reportId = reportId;
    if (item.type) li.dataset.type = String(item.type);

    const head = el('div', 'item-head');
    const nameId = 'hmr-item-' + index;
    const name = el('span', 'item-name', item.item_name || item.data_code || '（未命名项目）');
    name.id = nameId;
    const kind = kindLabel(item.type);
    if (kind) head.appendChild(el('span', 'kind kind-' + item.type, kind));
    head.appendChild(name);
    if (item.own === true) head.appendChild(el('span', 'own', '本院'));
    if (item.decided === 'recognised') {
      li.dataset.decided = 'recognised';
      head.appendChild(el('span', 'mark mark-recognised', '已互认'));
    } else if (item.decided === 'declined') {
      li.dataset.decided = 'declined';
      head.appendChild(el('span', 'mark mark-declined', '不互认'));
    }
    li.appendChild(head);

    li.appendChild(el('div', 'org', item.org_name || item.org_code || ''));
    const meta = el('div', 'meta');
    meta.appendChild(el('span', 'reported', '报告 ' + formatTime(item.reported_at)));
    meta.appendChild(el('span', 'valid', '有效期至 ' + formatTime(item.valid_until)));
    li.appendChild(meta);

    // The platform lets a hospital download only what it recognised (§6): the button is
    // there once this hospital decided 互认 for the report; before, the results are on the
    // platform's page (the dialog's link).
    if (item.decided === 'recognised' && reportId) {
      const download = el('button', 'download', '下载报告');
      download.type = 'button';
      download.setAttribute('aria-describedby', nameId);
      download.addEventListener('click', () => downloadReport(reportId, download));
      li.appendChild(download);
    } else {
      li.appendChild(el('p', 'download-note', '互认后可下载报告'));
    }
    return li;
  }

  async function downloadReport(reportId, button) {
    if (!reportId) return;
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    setStatus('正在下载报告…');
    try {
      const response = await request('../api/reports/' + encodeURIComponent(reportId) + '?format=pdf', {
        accept: 'application/pdf',
      });
      const blob = await response.blob();
      const href = URL.createObjectURL(blob);
      const a = document.createElement('a');
      a.href = href;
      a.download = '互认报告-' + reportId + '.pdf';
      a.hidden = true;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 60000);
      setStatus('报告已下载', 'ok');
    } catch (e) {
      setStatus('下载失败：' + errorText(e), 'error');
    } finally {
      button.disabled = false;
      button.removeAttribute('aria-busy');
    }
  }

  function normaliseBadge(answer) {
    const a = answer && typeof answer === 'object' ? answer : {};
    const items = Array.isArray(a.items) ? a.items.filter((i) => i && typeof i === 'object') : [];
    let count = Number(a.count);
    if (!Number.isFinite(count) || count < 0) count = items.length;
    return {
      status: a.status === 'ok' ? 'ok' : String(a.status || 'unavailable'),
      count: Math.floor(count),
      url: a.url || null,
      items,
      to_perform: Array.isArray(a.to_perform) ? a.to_perform : [],
      reason: typeof a.reason === 'string' ? a.reason : '',
    };
  }

  async function loadBadge() {
    document.body.dataset.hmrBadge = 'loading';
    const missing = ['patient_id', 'visit_no', 'doctor_no'].filter((k) => !params[k]);
    if (missing.length) {
      badge = { status: 'unavailable', count: 0, url: null, items: [], reason: '缺少参数：' + missing.join('、') };
    } else {
      const search = new URLSearchParams({
        patient_id: params.patient_id,
        visit_no: params.visit_no,
        doctor_no: params.doctor_no,
      });
      try {
        badge = normaliseBadge(await requestJson('../api/badge?' + search.toString()));
      } catch (e) {
        badge = { status: 'unavailable', count: 0, url: null, items: [], reason: errorText(e) };
      }
    }
    renderBadge();
    renderList();
    if (badge.status === 'invalid_patient') {
      setStatus('患者身份信息需更正（互认平台不接受该证件号码）', 'error');
    } else if (badge.status !== 'ok') {
      setStatus('互认平台暂不可用' + (badge.reason ? '：' + badge.reason : ''), 'error');
    } else if (badge.count > 0) {
      setStatus('本患者有 ' + badge.count + ' 项可互认的检查检验结果');
    } else {
      setStatus('');
    }
    post({ type: 'hmr:badge', count: badge.status === 'ok' ? badge.count : 0 });
    return {
      status: badge.status,
      count: badge.status === 'ok' ? badge.count : 0,
      url: badge.url,
      items: badge.items.slice(),
      reason: badge.reason || undefined,
    };
  }

  function refresh() {
    if (!badgeLoad) {
      badgeLoad = loadBadge().finally(() => {
        badgeLoad = null;
      });
    }
    return badgeLoad;
  }

  // ------------------------------------------------------------------ the forced dialog

  /** The dialog in progress: {checkId, matches, url, resolve, submitting, done}. */
  let pending = null;

  function radio(name, value, id, text) {
    const wrap = el('div', 'choice');
    const input = document.createElement('input');
    input.type = 'radio';
    input.name = name;
    input.value = value;
    input.id = id;
    input.required = true;
    const label = el('label', null, text);
    label.htmlFor = id;
    wrap.appendChild(input);
    wrap.appendChild(label);
    return wrap;
  }

  function renderMatch(match, index) {
    const orderId = String(match.order_id);
    const reports = Array.isArray(match.reports) ? match.reports.filter((r) => r && typeof r === 'object') : [];
    const first = reports[0] || {};
    const prefix = 'hmr-m' + index;

    const fieldset = el('fieldset', 'match');
    fieldset.dataset.orderId = orderId;
    const legend = el('legend');
    legend.appendChild(el('span', 'item-name', first.item_name || match.item_code || match.data_code || orderId));
    const org = first.org_name || first.org_code;
    if (org) legend.appendChild(el('span', 'org', org));
    if (first.reported_at) legend.appendChild(el('span', 'reported', formatTime(first.reported_at)));
    fieldset.appendChild(legend);

    if (first.valid_until || reports.length > 1) {
      const meta = el('p', 'meta');
      if (first.valid_until) meta.appendChild(el('span', 'valid', '有效期至 ' + formatTime(first.valid_until)));
      if (reports.length > 1) meta.appendChild(el('span', 'more', '另有 ' + (reports.length - 1) + ' 份可互认报告'));
      fieldset.appendChild(meta);
    }
    // The results before the choice: the platform shows them on the check's page (it lets a
    // hospital download a report only after recognising it).
    const page = pending ? safeUrl(pending.url) : null;
    if (page) {
      const view = el('p', 'view-results');
      view.appendChild(platformLink(page, '查看报告结果（互认平台）'));
      fieldset.appendChild(view);
    }

    const name = 'choice-' + orderId;
    const choices = el('div', 'choices');
    choices.appendChild(radio(name, 'recognise', prefix + '-recognise', '互认（采用已有结果，不重复开单）'));
    choices.appendChild(radio(name, 'decline', prefix + '-decline', '不互认'));
    fieldset.appendChild(choices);

    const reasonBox = el('div', 'reason-box');
    reasonBox.hidden = true;
    const reasonLabel = el('label', null, '不互认原因');
    reasonLabel.htmlFor = prefix + '-reason';
    const select = el('select', 'reason');
    select.id = prefix + '-reason';
    select.required = true;
    select.disabled = true;
    const placeholder = el('option', null, '请选择不互认原因');
    placeholder.value = '';
    select.appendChild(placeholder);
    for (const [code, text] of REASONS) {
      const option = el('option', null, text);
      option.value = code;
      select.appendChild(option);
    }
    reasonBox.appendChild(reasonLabel);
    reasonBox.appendChild(select);

    const textBox = el('div', 'reason-text-box');
    textBox.hidden = true;
    const textLabel = el('label', null, '请说明复查原因');
    textLabel.htmlFor = prefix + '-reason-text';
    const text = el('input', 'reason-text');
    text.type = 'text';
    text.id = prefix + '-reason-text';
    text.maxLength = 200;
    text.required = true;
    text.disabled = true;
    text.autocomplete = 'off';
    textBox.appendChild(textLabel);
    textBox.appendChild(text);
    reasonBox.appendChild(textBox);
    fieldset.appendChild(reasonBox);

    return fieldset;
  }

  /** The choice of one fieldset: {order_id, recognise, reason_code?, reason_text?} or null. */
  function choiceOf(fieldset) {
    const checked = fieldset.querySelector('input[type="radio"]:checked');
    if (!checked) return null;
    const orderId = fieldset.dataset.orderId;
    if (checked.value === 'recognise') return { order_id: orderId, recognise: true };
    const code = fieldset.querySelector('select.reason').value;
    if (!code) return null;
    if (code !== OTHER_REASON) return { order_id: orderId, recognise: false, reason_code: code };
    const text = fieldset.querySelector('input.reason-text').value.trim();
    if (!text) return null;
    return { order_id: orderId, recognise: false, reason_code: code, reason_text: text };
  }

  /** Shows the reason controls a fieldset's choice needs, and enables confirm when all are valid. */
  function syncDialog() {
    const fieldsets = Array.from($('hmr-matches').querySelectorAll('fieldset.match'));
    for (const fieldset of fieldsets) {
      const checked = fieldset.querySelector('input[type="radio"]:checked');
      const declined = !!checked && checked.value === 'decline';
      const reasonBox = fieldset.querySelector('.reason-box');
      const select = fieldset.querySelector('select.reason');
      const textBox = fieldset.querySelector('.reason-text-box');
      const text = fieldset.querySelector('input.reason-text');
      reasonBox.hidden = !declined;
      select.disabled = !declined;
      const other = declined && select.value === OTHER_REASON;
      textBox.hidden = !other;
      text.disabled = !other;
      select.setAttribute('aria-invalid', declined && !select.value ? 'true' : 'false');
      text.setAttribute('aria-invalid', other && !text.value.trim() ? 'true' : 'false');
      fieldset.classList.toggle('complete', choiceOf(fieldset) !== null);
    }
    const ready = fieldsets.length > 0 && fieldsets.every((f) => choiceOf(f) !== null);
    $('hmr-confirm').disabled = !ready || !pending || pending.submitting;
  }

  function openDialog(state) {
    const dialog = $('hmr-dialog');
    const matches = $('hmr-matches');
    matches.replaceChildren();
    state.matches.forEach((m, i) => matches.appendChild(renderMatch(m, i)));
    const link = $('hmr-dialog-link');
    link.replaceChildren();
    const url = safeUrl(state.url);
    if (url) link.appendChild(platformLink(url, '打开互认平台页面'));
    link.hidden = !url;
    $('hmr-dialog-error').textContent = '';
    syncDialog();
    showDialog();
    const first = matches.querySelector('input[type="radio"]');
    if (first) first.focus();
  }

  function showDialog() {
    const dialog = $('hmr-dialog');
    if (dialog.open) return;
    if (typeof dialog.showModal === 'function') {
      dialog.showModal();
    } else {
      dialog.setAttribute('open', '');
    }
  }

  function setDialogBusy(busy) {
    for (const fieldset of $('hmr-matches').querySelectorAll('fieldset.match')) fieldset.disabled = busy;
    $('hmr-dialog').setAttribute('aria-busy', busy ? 'true' : 'false');
  }

  async function confirmDialog() {
    const state = pending;
    if (!state || state.submitting || state.done) return;
    const fieldsets = Array.from($('hmr-matches').querySelectorAll('fieldset.match'));
    const choices = fieldsets.map(choiceOf);
    if (choices.some((c) => c === null)) {
      syncDialog();
      return;
    }
    state.submitting = true;
    $('hmr-confirm').disabled = true;
    $('hmr-dialog-error').textContent = '';
    setDialogBusy(true);
    setStatus('正在记录互认选择…');
    const decisions = [];
    try {
      for (const choice of choices) {
        const body = { check_id: state.checkId, order_id: choice.order_id, recognise: choice.recognise };
        if (!choice.recognise) {
          body.reason_code = choice.reason_code;
          if (choice.reason_text) body.reason_text = choice.reason_text;
        }
        decisions.push(await requestJson('../api/decide', { method: 'POST', json: body }));
      }
    } catch (e) {
      state.submitting = false;
      setDialogBusy(false);
      $('hmr-dialog-error').textContent = errorText(e);
      setStatus('互认选择未能全部记录，请重试', 'error');
      syncDialog();
      $('hmr-confirm').focus();
      return;
    }
    state.submitting = false;
    state.done = true;
    setDialogBusy(false);
    $('hmr-dialog').close();
    pending = null;
    document.body.dataset.hmrState = 'decided';
    setStatus('已记录互认选择，可保存医嘱', 'ok');
    // The list marks what was just decided (已互认 / 不互认).
    refresh();
    state.resolve({ check_id: state.checkId, duplicate: true, status: 'ok', decisions });
  }

  // ------------------------------------------------------------------ signing

  let signing = false;

  function normaliseOrders(orders) {
    if (!Array.isArray(orders) || orders.length === 0) throw new Error('没有需要校验的医嘱');
    return orders.map((o) => {
      if (!o || typeof o !== 'object' || o.order_id === undefined || o.order_id === null) {
        throw new Error('医嘱缺少 order_id');
      }
      return {
        order_id: String(o.order_id),
        item_code: o.item_code === undefined || o.item_code === null ? '' : String(o.item_code),
        type: o.type === undefined || o.type === null ? '' : String(o.type),
      };
    });
  }

  /** Checks the orders; with duplicates, the forced dialog until every order is decided. */
  async function sign(orders, visitType) {
    if (signing) throw new Error('上一次互认校验尚未完成');
    signing = true;
    try {
      document.body.dataset.hmrState = 'checking';
      document.body.dataset.hmrCheckId = '';
      setStatus('正在进行互认校验…');
      let answer;
      try {
        const list = normaliseOrders(orders);
        answer = await requestJson('../api/check', {
          method: 'POST',
          json: {
            patient_id: params.patient_id,
            visit_no: params.visit_no,
            doctor_no: params.doctor_no,
            visit_type: visitType ? String(visitType) : params.visit_type,
            orders: list,
          },
        });
      } catch (e) {
        document.body.dataset.hmrState = 'failed';
        setStatus('互认校验失败：' + errorText(e), 'error');
        throw e;
      }
      const a = answer && typeof answer === 'object' ? answer : {};
      const status = a.status === undefined || a.status === null ? 'unavailable' : String(a.status);
      const checkId = a.check_id === undefined || a.check_id === null ? null : String(a.check_id);
      document.body.dataset.hmrCheckId = checkId || '';

      // One fieldset per order (radio names are per order).
      const seen = new Set();
      const matches = (Array.isArray(a.matches) ? a.matches : []).filter((m) => {
        if (!m || typeof m !== 'object' || m.order_id === undefined || m.order_id === null) return false;
        const id = String(m.order_id);
        if (seen.has(id)) return false;
        seen.add(id);
        return true;
      });

      if (status !== 'ok' || a.duplicate !== true || !checkId || matches.length === 0) {
        document.body.dataset.hmrState = 'clear';
        if (status !== 'ok') {
          setStatus('互认校验暂不可用：' + (typeof a.reason === 'string' && a.reason ? a.reason : status), 'error');
        } else {
          setStatus('无重复检查检验，可保存', 'ok');
        }
        return { check_id: checkId, duplicate: false, status, decisions: [] };
      }

      setStatus('有重复的检查检验，请在弹窗中选择互认或不互认');
      const result = await new Promise((resolve) => {
        pending = { checkId, matches, url: a.url || null, resolve, submitting: false, done: false };
        document.body.dataset.hmrState = 'deciding';
        openDialog(pending);
      });
      return result;
    } finally {
      signing = false;
    }
  }

  function onMessage(event) {
    if (!hostOrigin || event.origin !== hostOrigin) return;
    if (!hasParent || event.source !== window.parent) return;
    const data = event.data;
    if (!data || typeof data !== 'object' || data.type !== 'hmr:sign') return;
    const source = event.source;
    const reply = (message) => {
      try {
        source.postMessage(message, hostOrigin);
      } catch (e) {
        // the host went away
      }
    };
    sign(data.orders, data.visit_type).then(
      (r) =>
        reply({ type: 'hmr:signed', check_id: r.check_id, duplicate: r.duplicate, status: r.status, decisions: r.decisions }),
      (e) => reply({ type: 'hmr:sign-failed', error: errorText(e) })
    );
  }

  // ------------------------------------------------------------------ start

  function start() {
    const badgeButton = $('hmr-badge');
    // A grey badge (nothing recognisable, or the platform not asked) opens nothing.
    badgeButton.addEventListener('click', () => {
      if (badge.status === 'ok' && badge.count > 0) setListOpen($('hmr-list').hidden);
    });

    const dialog = $('hmr-dialog');
    // The doctor must decide: Escape does not close the dialog.
    dialog.addEventListener('cancel', (event) => event.preventDefault());
    dialog.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') event.preventDefault();
    });
    // Should the browser close it anyway (a repeated close request), it opens again.
    dialog.addEventListener('close', () => {
      if (pending && !pending.done) {
        showDialog();
        const first = dialog.querySelector('fieldset.match input[type="radio"]:checked, fieldset.match input[type="radio"]');
        if (first) first.focus();
      }
    });
    const matches = $('hmr-matches');
    matches.addEventListener('change', syncDialog);
    matches.addEventListener('input', syncDialog);
    $('hmr-confirm').addEventListener('click', confirmDialog);

    window.addEventListener('message', onMessage);
    window.hmrWidget = Object.freeze({ sign, refresh });
    document.body.dataset.hmrState = 'idle';
    refresh();
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
