// Types of roomcast-client.js (the module beside this file). Checked against the module by
// tests/js-client/run.sh: every export and every public member declared here exists there.
// Written against TypeScript's DOM library (WebSocket, fetch, EventTarget, CustomEvent).

/** The client's connection state, as `status` events report it. */
export type State = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' | 'stopped';

/** A chat message as the relay sends it (in `message` events and in history). */
export interface ChatMessage {
  id: string;
  room: string;
  from: string;
  text: string;
  /** ISO 8601, milliseconds, UTC. */
  sentAt: string;
  /** Increases by one per message in the room (within one epoch). */
  seq: number;
}

export interface RoomcastClientOptions {
  /** Base URL (http(s) or ws(s)); defaults to the page's location. */
  url?: string;
  /** Default `/chat`. */
  path?: string;
  /** Default `lobby`. */
  room?: string;
  name?: string;
  token?: string;
  /** Reconnect backoff: full jitter up to min(maxDelayMs, baseDelayMs * 2^attempt). Default 500. */
  baseDelayMs?: number;
  /** Default 10,000. */
  maxDelayMs?: number;
  /** A connection open this long resets the backoff. Default 10,000. */
  stableAfterMs?: number;
  /** Minimum extra delay after close 1013. Default 1,000. */
  slowFloorMs?: number;
  /** Messages waiting to be sent or acknowledged (oldest dropped past it). Default 100. */
  maxQueue?: number;
  /** Default 65,536. */
  maxBufferedBytes?: number;
  /** Unacknowledged messages on the wire at once. Default 8. */
  maxInFlight?: number;
  /** Larger messages are refused locally (the relay would close with 1009). Default 2,048. */
  maxPayloadBytes?: number;
  /** Default 5,000. */
  probeTimeoutMs?: number;
  /** First pause after a rate_limited error, doubled up to maxDelayMs. Default 1,000. */
  rateLimitPauseMs?: number;
  /** Default Math.random. */
  random?: () => number;
  /** A WebSocket implementation (non-browser use, tests). Default globalThis.WebSocket. */
  WebSocket?: typeof WebSocket;
  /** Default globalThis.fetch. */
  fetch?: typeof fetch;
}

/** What `connect()` may change. */
export type ConnectSettings = Pick<RoomcastClientOptions, 'url' | 'path' | 'room' | 'name' | 'token'>;

export interface StatusDetail {
  state: State;
  attempt: number;
  delayMs?: number;
  code?: number;
  reason?: string;
  message?: string;
  probeStatus?: number;
  probing?: boolean;
}

export interface SystemDetail {
  message: string;
  clientId: number;
  /** The session the relay issued (32 hex digits); kept across reconnects. */
  session: string;
}

export interface HistoryDetail {
  room: string;
  epoch: string | null;
  /** Already de-duplicated against what this client has seen. */
  messages: ChatMessage[];
  complete: boolean | undefined;
  resumed: boolean;
  epochChanged: boolean;
}

export interface MessageDetail {
  message: ChatMessage;
}

export interface PresenceDetail {
  online: number;
  message: string;
  joined: string[];
  left: string[];
}

export interface AckDetail {
  requestId: string;
  id: string;
  seq: number;
  duplicate: boolean;
}

export interface ErrorDetail {
  /** The relay's error code (`rate_limited`, `too_large`, `bad_type`, ...). */
  code: string;
  message: string;
  text?: string;
  requestId?: string;
  willRetry: boolean;
  retryInMs?: number;
  /** Refused by this client before sending. */
  local?: boolean;
}

export type NoticeKind = 'history_incomplete' | 'gap' | 'queue_dropped' | 'origin_suspect';

export interface NoticeDetail {
  kind: NoticeKind;
  message: string;
  text?: string;
  requestId?: string;
  epochChanged?: boolean;
  complete?: boolean;
}

export interface RefusedDetail {
  status: 401 | 403 | 404;
  reason: 'unauthorized' | 'forbidden_origin' | 'not_found';
  message: string;
}

export interface QueueDetail {
  queued: number;
}

/** Every event the client emits, with its `detail`. */
export interface RoomcastEventMap {
  status: StatusDetail;
  system: SystemDetail;
  history: HistoryDetail;
  message: MessageDetail;
  presence: PresenceDetail;
  ack: AckDetail;
  error: ErrorDetail;
  notice: NoticeDetail;
  refused: RefusedDetail;
  queue: QueueDetail;
}

/** Where a room's resume position stands. */
export interface ResumeState {
  epoch: string | null;
  lastSeq: number;
}

export declare class RoomcastClient extends EventTarget {
  constructor(options?: RoomcastClientOptions);
  /** The options in force (defaults filled in). */
  options: Required<Omit<RoomcastClientOptions, 'url' | 'WebSocket' | 'fetch'>> &
    Pick<RoomcastClientOptions, 'url' | 'WebSocket' | 'fetch'>;
  readonly state: State;
  readonly room: string;
  /** Members online in the room (from the last presence event), or null while not connected. */
  readonly online: number | null;
  /** Messages waiting to be sent or acknowledged. */
  readonly queued: number;
  /** The session the relay issued, or null before the first greeting. */
  readonly session: string | null;
  /** The current WebSocket, if any (read-only; do not replace its handlers). */
  readonly socket: WebSocket | null;
  /** Forget a room's resume position (the next connect gets its full history). */
  forgetRoom(room?: string): void;
  resumeState(room?: string): ResumeState | undefined;
  /** Listen to an event; `fn` gets its detail. Returns a function that stops listening. */
  on<K extends keyof RoomcastEventMap>(type: K, fn: (detail: RoomcastEventMap[K]) => void): () => void;
  /** Connect (or reconnect with new settings). */
  connect(settings?: ConnectSettings): void;
  /** Close deliberately; no reconnect. Queued messages stay queued for the next connect(). */
  disconnect(): void;
  /** Queue a message; its requestId, or null when it can never be sent (an `error` says why). */
  send(text: string): string | null;
  addEventListener<K extends keyof RoomcastEventMap>(
    type: K,
    listener: (event: CustomEvent<RoomcastEventMap[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof RoomcastEventMap>(
    type: K,
    listener: (event: CustomEvent<RoomcastEventMap[K]>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

/** A sentence for a WebSocket close code. */
export declare function describeClose(code: number): string;

/** A fresh requestId (32 hex digits). */
export declare function newRequestId(): string;
