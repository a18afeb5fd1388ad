// How an app uses the roomcast-client package, type-checked by run.sh (tsc --strict) against the
// installed tarball's roomcast-client.d.ts. The @ts-expect-error lines must stay errors: they
// keep the types from being too loose to catch a mistake.
import {
  RoomcastClient,
  describeClose,
  newRequestId,
  type ChatMessage,
  type RoomcastEventMap,
  type State,
} from 'roomcast-client';

const client = new RoomcastClient({
  url: 'https://chat.example.com',
  room: 'lobby',
  name: 'ada',
  token: 'secret',
  maxQueue: 50,
});

const stop: () => void = client.on('message', ({ message }) => {
  const m: ChatMessage = message;
  console.log(m.from, m.text, m.seq.toFixed(0), new Date(m.sentAt));
});
client.on('status', ({ state, delayMs }) => {
  const s: State = state;
  if (s === 'reconnecting') console.log(`again in ${delayMs ?? 0} ms`);
});
client.on('history', ({ messages, complete }) => console.log(messages.length, complete));
client.on('presence', ({ online, joined }) => console.log(online, joined.join(', ')));
client.on('ack', ({ requestId, duplicate }) => console.log(requestId, duplicate));
client.on('error', ({ code, willRetry }) => console.log(code, willRetry));
client.on('notice', ({ kind }) => {
  if (kind === 'history_incomplete') console.log('gap');
});
client.on('refused', ({ status, reason }) => {
  if (status === 401 && reason === 'unauthorized') console.log('check the token');
});
client.addEventListener('queue', (event) => console.log(event.detail.queued));
client.connect();
client.connect({ room: 'other', token: 'another' });
const requestId: string | null = client.send('hello');
const position = client.resumeState('lobby');
if (position) console.log(position.epoch, position.lastSeq);
const details: RoomcastEventMap['system'] = { message: 'connected as ada', clientId: 1, session: newRequestId() };
console.log(requestId, details, client.state, client.queued, client.session, describeClose(1001));
client.forgetRoom();
client.disconnect();
stop();

// @ts-expect-error: not an event of the client
client.on('nope', () => {});
// @ts-expect-error: send takes the text
client.send(42);
// @ts-expect-error: a message event's detail holds the message; the text is inside it
client.on('message', (detail) => detail.text);
// @ts-expect-error: connect() takes the connection settings only
client.connect({ maxQueue: 5 });
// @ts-expect-error: read-only
client.state = 'open';
