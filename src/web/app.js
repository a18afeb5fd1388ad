// The roomcast chat page. All data from the relay is rendered with textContent, never as HTML.
import { RoomcastClient, describeClose } from './roomcast-client.js';

const $ = (id) => document.getElementById(id);
const ui = {
  join: $('join'), room: $('room'), name: $('name'), token: $('token'),
  connect: $('connect'), disconnect: $('disconnect'),
  status: $('status'), online: $('online'), queued: $('queued'),
  log: $('log'), composer: $('composer'), text: $('text'),
};

// Handy for opening two tabs: /?room=lobby&name=ada (the token is never taken from the URL).
const params = new URLSearchParams(location.search);
if (params.get('room')) ui.room.value = params.get('room');
if (params.get('name')) ui.name.value = params.get('name');

const client = new RoomcastClient({ url: location.href });
// Exposed for the browser console (and the end-to-end tests): the client and a short event trail.
const trail = [];
window.roomcast = { client, trail };
for (const type of ['status', 'history', 'ack', 'error', 'notice', 'refused']) {
  client.on(type, (detail) => {
    trail.push({ type, at: Date.now(), ...detail, messages: undefined });
    if (trail.length > 500) trail.shift();
  });
}

const ERROR_TEXT = {
  rate_limited: 'You are sending messages too fast.',
  too_large: 'That message is too long.',
  bad_json: 'The relay could not read that message (invalid JSON).',
  bad_type: 'The relay did not accept that kind of message.',
  empty: 'Empty messages are not sent.',
};

let shownRoom = null;
let myName = '';
let wasOpen = false;

// ---- rendering ----------------------------------------------------------------------------

function append(li) {
  const nearBottom = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
  ui.log.append(li);
  if (nearBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

function span(className, text) {
  const el = document.createElement('span');
  el.className = className;
  el.textContent = text;
  return el;
}

function addMessage(m) {
  const li = document.createElement('li');
  li.className = 'msg';
  if (m.id != null) li.dataset.id = String(m.id);
  if (m.seq != null) li.dataset.seq = String(m.seq);
  const when = new Date(m.sentAt);
  if (!Number.isNaN(when.getTime())) {
    const time = document.createElement('time');
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    li.append(time, ' ');
  }
  li.append(span('from', String(m.from ?? '?')), span('sep', ': '), span('text', String(m.text ?? '')));
  append(li);
}

function addNotice(kind, text, extraClass = '') {
  const li = document.createElement('li');
  li.className = `notice ${extraClass}`.trim();
  li.dataset.kind = kind;
  li.textContent = text;
  append(li);
}

function addPresence(text) {
  const li = document.createElement('li');
  li.className = 'presence';
  li.textContent = text;
  append(li);
}

const quote = (text) => {
  const t = String(text ?? '');
  return t ? ` “${t.length > 60 ? `${t.slice(0, 60)}…` : t}”` : '';
};

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
  const active = state === 'connecting' || state === 'open' || state === 'reconnecting';
  ui.disconnect.disabled = !active;
}

// ---- client events ------------------------------------------------------------------------

client.on('status', (s) => {
  const room = client.room;
  switch (s.state) {
    case 'connecting':
      setStatus('connecting', s.probing ? 'Connecting… (checking why the last attempt failed)' : `Connecting to room ${room}…`);
      break;
    case 'open':
      setStatus('open', `Connected to room ${room}`);
      if (wasOpen) addNotice('reconnected', 'Reconnected.');
      wasOpen = true;
      break;
    case 'reconnecting': {
      // probeStatus is only set when the socket never opened (see roomcast-client.js).
      const why = s.probeStatus === undefined ? `Connection lost: ${describeClose(s.code)}`
        : s.probeStatus === 0 ? 'The relay is unreachable'
        : s.probeStatus === 503 ? 'The relay is full or restarting'
        : 'The connection could not be opened';
      const secs = (s.delayMs / 1000).toFixed(1);
      setStatus('reconnecting', `${why}. Reconnecting in ${secs} s (attempt ${s.attempt})…`);
      if (wasOpen) {
        addNotice('outage', `Connection lost: ${describeClose(s.code)}. Reconnecting automatically; messages you send are kept until it is back.`);
        wasOpen = false; // one notice per outage
      }
      break;
    }
    case 'closed':
      setStatus('closed', 'Disconnected');
      ui.online.textContent = '–';
      break;
    case 'stopped':
      setStatus('stopped', `Stopped: ${s.message ?? describeClose(s.code)}`);
      ui.online.textContent = '–';
      if (s.reason === 'policy') addNotice('policy', `${s.message} Not reconnecting.`, 'error');
      break;
    default:
      break;
  }
});

client.on('system', ({ message }) => {
  const m = /^connected as (.*)$/.exec(String(message ?? ''));
  if (m) {
    myName = m[1];
    setStatus('open', `Connected to room ${client.room} as ${myName}`);
  }
});

client.on('history', ({ messages, resumed }) => {
  if (resumed && messages.length) addNotice('resumed', `${messages.length} message(s) you missed:`);
  for (const m of messages) addMessage(m);
});

client.on('message', ({ message }) => addMessage(message));

client.on('presence', ({ online, message }) => {
  if (typeof online === 'number') ui.online.textContent = String(online);
  if (message) addPresence(String(message));
});

client.on('queue', ({ queued }) => { ui.queued.textContent = String(queued); });

let lastRetry = null; // {requestId, li}: repeated rate-limit refusals of one message update one line

client.on('error', ({ code, message, text, requestId, willRetry, retryInMs }) => {
  const what = ERROR_TEXT[code] ?? `The relay reported an error (${code}${message ? `: ${message}` : ''}).`;
  const fate = text == null ? '' : willRetry ? ` Sending again in ${Math.ceil(retryInMs / 1000)} s:` : ' Not sent:';
  const line = `${what}${fate}${quote(text)}`;
  if (willRetry && lastRetry?.requestId === requestId && ui.log.lastElementChild === lastRetry.li) {
    lastRetry.li.textContent = line;
    return;
  }
  addNotice(`error-${code}`, line, 'error');
  lastRetry = willRetry ? { requestId, li: ui.log.lastElementChild } : null;
});

client.on('notice', ({ kind, message, text }) => {
  addNotice(kind, `${message}${kind === 'queue_dropped' ? quote(text) : ''}`);
});

client.on('refused', ({ message }) => {
  addNotice('refused', `Connection refused: ${message} Not retrying — check the settings and press Connect.`, 'refused');
});

// ---- user actions -------------------------------------------------------------------------

ui.join.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const room = ui.room.value.trim();
  if (room !== shownRoom) {
    ui.log.replaceChildren();
    client.forgetRoom(room);
    shownRoom = room;
    document.title = `${room} · roomcast`;
  }
  wasOpen = false;
  client.connect({ room, name: ui.name.value.trim(), token: ui.token.value });
  ui.text.focus();
});

ui.disconnect.addEventListener('click', () => {
  client.disconnect();
  addNotice('disconnected', 'Disconnected.');
  ui.connect.focus();
});

ui.composer.addEventListener('submit', (ev) => {
  ev.preventDefault(); // Enter in the message box submits this form
  const text = ui.text.value;
  if (!text.trim()) return;
  if (client.state === 'idle') {
    addNotice('not_connected', 'Connect to a room first.', 'error');
    return;
  }
  if (client.send(text) !== null) ui.text.value = '';
  if (client.state === 'stopped' || client.state === 'closed') {
    addNotice('queued', 'Not connected: the message will be sent when you connect again.');
  }
});
