/**
 * Halflife's TypeScript client: plain values in (Dates, arrays, objects),
 * plain arrays and typed messages out.
 *
 * The generated code (src/gen, by protoc-gen-es from protos/) is re-exported
 * for callers who want the raw Connect clients: `client.raw.recommend.recommend(...)`.
 * Errors are `ConnectError`s; `fieldViolations(error)` reads the
 * google.rpc.BadRequest the server attaches to INVALID_ARGUMENT / NOT_FOUND.
 */
import { create, toBinary, type DescMethod } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type CallOptions, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { isIPv6 } from "node:net";

import { BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";
import { CatalogService, ItemSchema, type Item as ItemMessage } from "./gen/halflife/v1/catalog_pb.js";
import { EmbeddingService, type GetModelInfoResponse } from "./gen/halflife/v1/embedding_pb.js";
import {
  EventSchema,
  EventType,
  InterestService,
  type Event as EventMessage,
  type GetProfileResponse,
} from "./gen/halflife/v1/interest_pb.js";
import {
  ItemFilterSchema,
  RecommendService,
  Strategy,
  type Explanation,
  type ScoredItem as ScoredItemMessage,
} from "./gen/halflife/v1/recommend_pb.js";

export * as catalog from "./gen/halflife/v1/catalog_pb.js";
export * as embedding from "./gen/halflife/v1/embedding_pb.js";
export * as interest from "./gen/halflife/v1/interest_pb.js";
export * as recommend from "./gen/halflife/v1/recommend_pb.js";
export { Code, ConnectError, EventType, Strategy };
export type { Interceptor };

/** `halflife serve`'s port, which an address without one gets (see `serverUrl`). */
export const DEFAULT_PORT = 50051;

/** Per-call deadline unless a call passes its own `timeoutMs`. */
export const DEFAULT_TIMEOUT_MS = 10_000;

/** The largest message either way, the server's limit: a larger request fails `ResourceExhausted` unsent. */
export const MAX_MESSAGE_BYTES = 64 * 2 ** 20;

// An HTTP/2 stream's initial flow-control window: a request within it is never held back mid-upload.
const HTTP2_WINDOW_BYTES = 65_535;

/**
 * How many times in all a call is tried when it fails `Unavailable` (a dropped
 * or reset connection, a server starting or restarting) or a server shutting
 * down answers `Canceled` (calls it had not started: grpc/grpc#41785), and a
 * `recordEvents` that fails `Aborted` (items its events name changed under
 * each of the server's tries: nothing was recorded), with jittered backoff
 * from 100 ms, doubling (0-100, 0-200, 0-400 ms: at most 0.7 s of waiting, for
 * a blip, not a restart, which the caller retries), within the call's
 * deadline. Every Halflife call is safe to repeat; no other code is retried
 * (nor another call's `Aborted`), nor a cancel of the caller's own. As the
 * Go client does; the Python client retries the same codes through gRPC's
 * retry policy, whose waits are 0.1, 0.2 and 0.4 s, each within 20%.
 */
export const RETRY_ATTEMPTS = 4;
/** The List RPCs' largest page (`listItems`, `listEvents`). */
export const MAX_PAGE_SIZE = 1000;

/** What every call takes: its deadline (default the client's `timeoutMs`) and a signal that cancels it. */
export interface CallInput {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface ClientOptions {
  /**
   * Deadline of every call, in milliseconds (default 10 s): a positive number,
   * rounded up to a whole millisecond, or `Infinity` for none. (Connect takes 0
   * or less for "no deadline", and Node's timers fire at once past 2^31 - 1 ms:
   * 0 and negative values are refused, longer ones are waited for as none.)
   */
  timeoutMs?: number;
  /** Connect interceptors (auth headers, logging), run on each try, inside the retries. */
  interceptors?: Interceptor[];
}

/** setTimeout's limit (~24.8 days); a longer deadline would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** An item to upsert. `text` or `vector` is required. */
export interface ItemInput {
  id: string;
  text?: string;
  categories?: string[];
  attributes?: Record<string, string>;
  /** Publication time, for the optional freshness decay. */
  createTime?: Date;
  /**
   * Precomputed embedding of exactly `modelInfo().dimension` floats; only its direction is kept, so one with values
   * float32 cannot hold is scaled to fit it.
   */
  vector?: number[];
}

/** An item as stored: plain values. */
export interface StoredItem {
  id: string;
  text: string;
  categories: string[];
  attributes: Record<string, string>;
  createTime?: Date;
  /** The embedding when asked for with `includeVectors`; empty otherwise. */
  vector: number[];
}

function storedItem(i: ItemMessage): StoredItem {
  return {
    id: i.id,
    text: i.text,
    categories: [...i.categories],
    attributes: { ...i.attributes },
    createTime: i.createTime ? timestampDate(i.createTime) : undefined,
    vector: Array.from(i.vector),
  };
}

/** Event types by lower-case name: "view", "click", "add_to_cart", ... */
export type EventTypeName = Lowercase<Exclude<keyof typeof EventType, "UNSPECIFIED">>;

/** `EventTypeName`'s values, from the generated enum (whose keys also hold its reverse mapping, "1": "VIEW"). */
const EVENT_TYPE_NAMES = Object.entries(EventType)
  .filter(([, value]) => typeof value === "number" && value !== EventType.UNSPECIFIED)
  .map(([key]) => key.toLowerCase());

/** One user action. `itemId` or `text` is required. */
export interface EventInput {
  /** Idempotency key: a re-sent event is stored once. */
  eventId: string;
  userId: string;
  type: EventType | EventTypeName;
  itemId?: string;
  text?: string;
  /** E.g. the rating of a "rate" event. */
  value?: number;
  /** When it happened; default: when the server received it. */
  eventTime?: Date;
}

/** An event as stored (`listEvents`): its time is the server's receipt time where none was sent. */
export interface StoredEvent {
  eventId: string;
  userId: string;
  /** By name; a type newer than this client by its number. */
  type: EventTypeName | number;
  itemId?: string;
  text?: string;
  value?: number;
  eventTime: Date;
}

function storedEvent(e: EventMessage): StoredEvent {
  return {
    eventId: e.eventId,
    userId: e.userId,
    type: e.type in EventType ? (EventType[e.type].toLowerCase() as EventTypeName) : e.type,
    itemId: e.itemId || undefined,
    text: e.text || undefined,
    value: e.value,
    eventTime: e.eventTime ? timestampDate(e.eventTime) : new Date(Number.NaN), // (the server always sets it)
  };
}

/** The elements of every page a List RPC returns, from the first on: `page(pageToken)` reads one. */
async function* paged<T>(page: (pageToken: string) => Promise<[T[], string]>): AsyncGenerator<T> {
  let pageToken = "";
  do {
    const [elements, next] = await page(pageToken);
    yield* elements;
    pageToken = next;
  } while (pageToken);
}

/** Which items may be returned. */
export interface FilterInput {
  includeCategories?: string[];
  excludeCategories?: string[];
  excludeItemIds?: string[];
}

/** A time range of events, by event time: from `startTime` on (unset: the first), before `endTime` (unset: the last). */
export interface EventTimeRange {
  startTime?: Date;
  endTime?: Date;
}

export interface RecommendOptions extends CallInput {
  /** 1 to 1000 (default 10). */
  limit?: number;
  /** "Now" for the recommendation; default the server's clock. */
  asOf?: Date;
  filter?: FilterInput;
  includeSeen?: boolean;
  query?: string;
  explain?: boolean;
  /** 0 (pure relevance, default) to 1. */
  diversity?: number;
}

/** A ranked item. */
export interface ScoredItem {
  itemId: string;
  score: number;
  /** Set when `explain` was asked for. */
  explanation?: Explanation;
}

export interface Recommendations {
  items: ScoredItem[];
  strategy: Strategy;
}

/**
 * The server answered without a field this client asked for: it predates it (upgrade the server), and its answer
 * differs from the one asked for (`listEvents`' `newestFirst`: its events oldest first).
 */
export class ServerTooOldError extends Error {
  override name = "ServerTooOldError";
}

export interface FieldViolation {
  field: string;
  description: string;
}

function eventType(name: string, type: EventType | EventTypeName): EventType {
  if (typeof type === "number") return int32(name, type);
  // Not the enum's reverse mapping: EventType["1"] is "VIEW", a string.
  const value = typeof type === "string" ? EventType[type.toUpperCase() as keyof typeof EventType] : undefined;
  if (typeof value !== "number") {
    throw new TypeError(`unknown event type ${JSON.stringify(type)}: one of ${EVENT_TYPE_NAMES.join(", ")}`);
  }
  return value;
}

/**
 * `value` when it is a string; undefined or null is `absent` where the field is optional (as the Python client takes
 * None). protobuf-es writes a string field through String(): a number id 414 went out as "414", a float as "1.5",
 * an object as "[object Object]", which the Python client refuses (and Go's types).
 */
function text(name: string, value: unknown, absent?: string): string {
  if (value == null && absent !== undefined) return absent;
  if (typeof value !== "string") throw new TypeError(`${name} must be a string, not ${shown(value)}`);
  // UTF-8 holds no lone surrogate: protobuf-es wrote one as U+FFFD, so "ana\uD83D" and "ana\uDE00" were the same
  // user (deleteUser of one deleted the other's events). The Python client refuses it too.
  const lone = LONE_SURROGATE.exec(value);
  if (lone) {
    const code = lone[0].charCodeAt(0).toString(16).toUpperCase();
    throw new TypeError(`${name} must be valid UTF-8 text, not a string with a lone surrogate (U+${code} at ${lone.index})`);
  }
  return value;
}

// With the u flag a pair is one code point: \p{Cs} matches a surrogate only where it stands alone.
const LONE_SURROGATE = /\p{Cs}/u;

/**
 * `value` when it is a boolean; undefined or null is false (not given). protobuf-es sends any truthy value as
 * true: includeSeen "false" went out as true, and seen items were recommended.
 */
function flag(name: string, value: unknown): boolean {
  if (value == null) return false;
  if (typeof value !== "boolean") throw new TypeError(`${name} must be a boolean, not ${shown(value)}`);
  return value;
}

/**
 * `value` when it is a number (NaN goes on: the server names it); undefined or null is `absent`. protobuf-es
 * wrote a double field through Number(): a value "4.5" went out as 4.5, "abc" as NaN, and a bigint failed as a
 * Code.Internal ConnectError.
 */
function number(name: string, value: unknown, absent?: number): number | undefined {
  if (value == null) return absent;
  if (typeof value !== "number") throw new TypeError(`${name} must be a number, not ${shown(value)}`);
  return value;
}

/**
 * `values` when it is an array of objects (the items or events of a call): an object alone failed as "items.map is
 * not a function", and a null in it as "Cannot read properties of null (reading 'id')".
 */
function records<T>(name: string, values: readonly T[]): readonly T[] {
  if (!Array.isArray(values)) throw new TypeError(`${name} takes an array, not ${shown(values)}`);
  values.forEach((value, at) => {
    if (value == null || typeof value !== "object") throw new TypeError(`${name}[${at}] must be an object, not ${shown(value)}`);
  });
  return values;
}

/** What `value` is, for an error: "undefined", "null", "number 414", "an array", "an object". */
function shown(value: unknown): string {
  if (value == null) return String(value);
  if (typeof value !== "object") return `${typeof value} ${String(value)}`;
  return Array.isArray(value) ? "an array" : "an object";
}

/**
 * `value` (undefined or null: none) when it is a plain object whose values are strings, as `text`. A Map went out as
 * no attributes at all (its entries are no properties).
 */
function attributes(name: string, value: Record<string, string> | undefined): Record<string, string> {
  if (value == null) return {};
  const prototype = typeof value === "object" ? Object.getPrototypeOf(value) : undefined;
  if (prototype !== Object.prototype && prototype !== null) {
    const what = value instanceof Map ? "a Map" : shown(value);
    throw new TypeError(`${name} takes a plain object of strings, not ${what}`);
  }
  for (const [key, item] of Object.entries(value)) {
    text(`${name} key ${JSON.stringify(key)}`, key);
    text(`${name}[${JSON.stringify(key)}]`, item);
  }
  return value;
}

/**
 * `values` when it is an array of strings (undefined or null: none). A lone string is refused: JavaScript
 * would take it for the list of its characters, and deleteItems("sku-1") deleted
 * the items "s", "k", "u", "-" and "1".
 */
function strings(name: string, values: readonly string[] | undefined): string[] {
  if (values == null) return [];
  if (!Array.isArray(values)) throw new TypeError(`${name} takes an array of strings, not ${shown(values)}`);
  // Each named, as `text` names one (the whole array went into the message, and a bigint in it made that
  // message "Do not know how to serialize a BigInt").
  values.forEach((value, at) => text(`${name}[${at}]`, value));
  return [...values];
}

/**
 * `vector` as the wire's float32. The server keeps its direction alone (it L2-normalises it), so a finite vector
 * that float32 cannot hold is scaled by its largest entry first, as the Python client does: an entry past ~3.4e38
 * was refused here (a RangeError; before that protobuf's Code.Internal, a review), and one of entries all below
 * ~1e-45 went out as zeros, refused as "all zeros" though the caller sent a direction. NaN and the infinities go
 * on: the server names them in a BadRequest.
 */
function wireVector(vector: number[]): number[] {
  const largest = vector.reduce((max, v) => Math.max(max, Math.abs(v)), 0);
  const unheld = largest > FLOAT32_MAX || vector.every((v) => Math.fround(v) === 0);
  return Number.isFinite(largest) && largest > 0 && unheld ? vector.map((v) => v / largest) : vector;
}

const FLOAT32_MAX = 3.4028234663852886e38;

/** `value` when it is a whole number an int32 field holds; protobuf's own error was a Code.Internal ConnectError. */
function int32(name: string, value: number): number {
  if (!Number.isInteger(value) || value < -(2 ** 31) || value >= 2 ** 31) {
    throw new RangeError(`${name} must be a 32-bit whole number, not ${value}`);
  }
  return value;
}

/** Milliseconds in a grpc-timeout header's unit. */
const TIMEOUT_UNIT_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 };

/**
 * Tries a call as RETRY_ATTEMPTS says; `closed()`: the client was closed (its
 * Canceled is final). Each try carries the time left as its grpc-timeout, as
 * gRPC's own clients send it: a retry re-sent the first try's, so the server
 * counted the whole deadline again from each try's arrival (a review).
 */
function retries(closed: () => boolean): Interceptor {
  return (next) => async (request) => {
    const started = performance.now();
    const header = /^(\d+(?:\.\d+)?)([HMSmun])$/.exec(request.header.get("grpc-timeout") ?? "");
    const budgetMs = header ? Number(header[1]) * TIMEOUT_UNIT_MS[header[2]] : undefined;
    for (let attempt = 1, backoffMs = 100; ; attempt++, backoffMs *= 2) {
      try {
        if (budgetMs !== undefined && attempt > 1) {
          const leftMs = Math.max(1, Math.ceil(budgetMs - (performance.now() - started)));
          request.header.set("grpc-timeout", `${leftMs}m`);
        }
        return await next(request);
      } catch (thrown) {
        if (request.signal.aborted) throw cancelled(request.signal.reason);
        const error = asGrpcCode(thrown);
        if (attempt === RETRY_ATTEMPTS || !retryable(request.method, error.code) || closed()) throw error;
        const waited = await new Promise<boolean>((resolve) => {
          const stop = () => (clearTimeout(timer), resolve(false));
          const wake = () => (request.signal.removeEventListener("abort", stop), resolve(true));
          const timer = setTimeout(wake, Math.random() * backoffMs); // gRPC's jitter: 0 to the backoff
          request.signal.addEventListener("abort", stop, { once: true });
        });
        // The deadline or the caller's cancel came first: theirs is the outcome (it was this try's Unavailable).
        if (!waited) throw cancelled(request.signal.reason);
      }
    }
  };
}

/**
 * Whether a try of `method` that failed `code` is tried again (see RETRY_ATTEMPTS). `Aborted` is
 * RecordEvents' "nothing was recorded, resend"; elsewhere it can mean a conflict to redo at a higher
 * level (AIP-194).
 */
function retryable(method: DescMethod, code: Code): boolean {
  if (code === Code.Aborted) return method === InterestService.method.recordEvents;
  return code === Code.Unavailable || code === Code.Canceled;
}

/**
 * What a call whose signal aborted ends with: the deadline's own error, or
 * `Canceled` for the caller's cancel whatever its reason (Connect made an
 * Error given to `abort()` `Internal`, "a server bug", a review).
 */
function cancelled(reason: unknown): ConnectError {
  if (reason instanceof ConnectError) return reason;
  const message = reason instanceof Error ? reason.message : reason === undefined ? "cancelled" : String(reason);
  return new ConnectError(message, Code.Canceled, undefined, undefined, reason);
}

/**
 * `error` as gRPC's own clients report it: Connect calls a connection the peer
 * reset `Aborted`, which this API keeps for "nothing was stored: retry", where
 * a write may have been; and a stream the server refused (HTTP/2 RST_STREAM
 * REFUSED_STREAM: it never started the call, as when more than 256 calls
 * share a connection) `Internal`, which says "a server bug". The Python and
 * Go clients see `Unavailable` and retry (an audit and a review found such
 * calls neither retried nor told apart: 373 of 2,000 concurrent calls failed).
 */
function asGrpcCode(error: unknown): ConnectError {
  const connectError = ConnectError.from(error);
  if (connectError.code !== Code.Aborted && connectError.code !== Code.Internal) return connectError;
  for (let cause: unknown = connectError.cause, depth = 0; cause instanceof Error && depth < 8; depth++) {
    const nodeCode = (cause as NodeJS.ErrnoException).code;
    const reset = connectError.code === Code.Aborted && nodeCode === "ECONNRESET";
    const refused = nodeCode === "ERR_HTTP2_STREAM_ERROR" && cause.message.includes("REFUSED_STREAM");
    if (reset || refused) {
      return new ConnectError(connectError.rawMessage, Code.Unavailable, connectError.metadata, undefined, connectError.cause);
    }
    cause = cause.cause;
  }
  return connectError;
}

/**
 * A generated client whose calls take a `timeoutMs` past Node's timer limit
 * as none, as the wrapper's do: Connect's timer fired at once (a review).
 */
function withLongTimeouts<T extends object>(client: T): T {
  return new Proxy(client, {
    get(target, key, receiver) {
      const method: unknown = Reflect.get(target, key, receiver);
      if (typeof method !== "function") return method;
      return (request: unknown, options?: CallOptions) =>
        method.call(target, request, (options?.timeoutMs ?? 0) > MAX_TIMER_MS ? { ...options, timeoutMs: 0 } : options);
    },
  });
}

/** A deadline for Connect (see ClientOptions.timeoutMs): undefined for none. */
function deadline(timeoutMs: number): number | undefined {
  if (typeof timeoutMs !== "number" || !(timeoutMs > 0)) {
    throw new RangeError(`timeoutMs must be a positive number of milliseconds (Infinity: none), not ${timeoutMs}`);
  }
  // A fractional value went out as an invalid grpc-timeout header, and broke the connection for later calls.
  return timeoutMs > MAX_TIMER_MS ? undefined : Math.ceil(timeoutMs);
}

function filter(options: FilterInput | undefined) {
  return options == null ? undefined : create(ItemFilterSchema, {
    includeCategories: strings("filter.includeCategories", options.includeCategories),
    excludeCategories: strings("filter.excludeCategories", options.excludeCategories),
    excludeItemIds: strings("filter.excludeItemIds", options.excludeItemIds),
  });
}

function stamp(name: string, date: Date | undefined): Timestamp | undefined {
  if (date == null) return undefined; // null too, as the Python client's None: it was "not a valid Date"
  // An invalid Date failed as Connect's "The number NaN cannot be converted to a BigInt" (an audit).
  if (!(date instanceof Date) || Number.isNaN(date.getTime())) throw new RangeError(`${name} is not a valid Date`);
  return timestampFromDate(date);
}

function scored(items: ScoredItemMessage[]): ScoredItem[] {
  return items.map((i) => ({ itemId: i.itemId, score: i.score, explanation: i.explanation }));
}

/**
 * The (field, description) pairs of the google.rpc.BadRequest detail of a
 * failed call, e.g. `{field: "events[0].item_id", description: "..."}`;
 * empty when the error carries none.
 */
export function fieldViolations(error: unknown): FieldViolation[] {
  const connectError = ConnectError.from(error);
  return connectError
    .findDetails(BadRequestSchema)
    .flatMap((b) => b.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
}

/**
 * The base URL a client of `address` calls. "host:port" is plaintext HTTP/2;
 * a host with no port ("localhost", "10.0.0.7", "[::1]") or an empty one
 * ("localhost:") gets DEFAULT_PORT, `halflife serve`'s, as the CLI's --target
 * and the Python and Go clients do (it went to the "http://" URL's port, 80).
 * A full "http://" or "https://" URL keeps URL semantics, the scheme's port
 * included where it names none: a URL is explicit, and "https://host" means
 * 443 (a TLS proxy, say). Throws a TypeError for an empty address, a bare IPv6
 * address (its last group would pass for a port: write "[::1]"), or anything
 * else that is no host[:port] or URL ("unix:/path": Connect takes URLs only;
 * "localhost/x", which went to port 80),
 * and a RangeError for a port outside 1-65535.
 */
export function serverUrl(address: string): string {
  if (typeof address !== "string") {
    throw new TypeError(`address must be a string such as "127.0.0.1:${DEFAULT_PORT}", not ${typeof address}`);
  }
  const trimmed = address.trim();
  if (/^https?:\/\//i.test(trimmed)) return checkedUrl(trimmed, address);
  if (trimmed === "") throw new TypeError("address must be host:port, got an empty string");
  if (isIPv6(trimmed)) throw new TypeError(`an IPv6 address goes in brackets: [${trimmed}]:port`);
  const [, host, port = ""] = /^(\[[^\]]*\]|[^:]*)(?::(.*))?$/.exec(trimmed) ?? [];
  // A port is digits, signed or not, as the Python and Go clients take one: "-1" is out of range, not malformed.
  if (host === undefined || (port !== "" && !/^[+-]?[0-9]+$/.test(port))) throw notAnAddress(address);
  const number = port === "" ? DEFAULT_PORT : Number(port);
  if (!(number >= 1 && number <= 65535)) throw new RangeError(`port must be 1 to 65535, got ${port}`);
  return checkedUrl(`http://${host}:${number}`, address, true);
}

function notAnAddress(address: string): TypeError {
  return new TypeError(`address must be host[:port] or an http(s):// URL, got ${JSON.stringify(address)}`);
}

/**
 * `url` when it parses (the host too: "a b:1" does not), as Connect takes it; URL.canParse needs Node 18.17. From a
 * host[:port] (`hostPort`), a URL of a host and a port alone: "localhost/x", "h?x", "h#x" and "h\x" parsed as a
 * path, a query or a fragment after the host, and went to the "http://" URL's port, 80; "user@h" as a user.
 */
function checkedUrl(url: string, address: string, hostPort = false): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw notAnAddress(address);
  }
  if (hostPort && (parsed.pathname !== "/" || parsed.search || parsed.hash || parsed.username || parsed.password)) {
    throw notAnAddress(address);
  }
  return url;
}

/**
 * A connection to one Halflife server over gRPC (HTTP/2 cleartext).
 *
 *     const client = new HalflifeClient("127.0.0.1:50051");
 *     const vectors = await client.embed(["trail running shoes"]);
 *     client.close();
 */
export class HalflifeClient {
  /** The generated Connect clients, for anything the wrapper does not cover. */
  readonly raw: {
    embedding: Client<typeof EmbeddingService>;
    catalog: Client<typeof CatalogService>;
    interest: Client<typeof InterestService>;
    recommend: Client<typeof RecommendService>;
  };
  private readonly sessions: Http2SessionManager;
  private readonly timeoutMs: number;
  private closed = false;

  /** `address` is "host[:port]" (plaintext, DEFAULT_PORT where it names none) or a full "http(s)://" URL: `serverUrl`. */
  constructor(address: string, options: ClientOptions = {}) {
    const baseUrl = serverUrl(address);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    deadline(this.timeoutMs); // refused here rather than at the first call
    this.sessions = new Http2SessionManager(baseUrl);
    // After close(), the session manager would quietly connect again.
    const open: Interceptor = (next) => (request) => {
      if (this.closed) throw new ConnectError("the client is closed", Code.Canceled);
      // A `raw` call's fractional timeoutMs (wrapper calls round theirs) made an invalid grpc-timeout header.
      const timeout = request.header.get("grpc-timeout");
      if (timeout?.includes(".")) request.header.set("grpc-timeout", `${Math.ceil(parseFloat(timeout))}m`);
      return next(request);
    };
    // Node's http2 never gives back the session memory of a request cut off mid-upload (its deadline or a
    // cancel while the server's flow control held the rest back): past maxSessionMemory (10 MB) every later
    // call failed Internal NGHTTP2_ENHANCE_YOUR_CALM, for the client's life (a review: one 10 MB upsert cut
    // off at 50 ms). After such a call, the next ones get a new connection; calls still on the old one end
    // Canceled and are tried again (every call is idempotent).
    const recycle: Interceptor = (next) => async (request) => {
      try {
        return await next(request);
      } catch (thrown) {
        const error = ConnectError.from(thrown);
        const cutOff = (error.code === Code.DeadlineExceeded || error.code === Code.Canceled) && !request.stream &&
          toBinary(request.method.input, request.message).byteLength > HTTP2_WINDOW_BYTES;
        if (!this.closed && (cutOff || error.rawMessage.includes("ENHANCE_YOUR_CALM"))) this.sessions.abort();
        throw error;
      }
    };
    const transport = createGrpcTransport({
      baseUrl,
      sessionManager: this.sessions,
      // The server's limit, as the Python and Go clients set it: a larger request was sent anyway, stalled
      // until its deadline and then broke the connection (a review), where it is refused at once now.
      writeMaxBytes: MAX_MESSAGE_BYTES,
      readMaxBytes: MAX_MESSAGE_BYTES,
      // `raw` calls too (an audit found them without a deadline); a raw call's own timeoutMs <= 0 is none.
      defaultTimeoutMs: deadline(this.timeoutMs),
      interceptors: [recycle, retries(() => this.closed), open, ...(options.interceptors ?? [])],
    });
    this.raw = {
      embedding: withLongTimeouts(createClient(EmbeddingService, transport)),
      catalog: withLongTimeouts(createClient(CatalogService, transport)),
      interest: withLongTimeouts(createClient(InterestService, transport)),
      recommend: withLongTimeouts(createClient(RecommendService, transport)),
    };
  }

  private opts(options: CallInput): CallOptions {
    // Connect takes 0 for "no deadline" where the transport has a default.
    return { timeoutMs: deadline(options.timeoutMs ?? this.timeoutMs) ?? 0, signal: options.signal };
  }

  /** Unit-length embeddings (unless `skipNormalize`), one array per text. */
  async embed(
    texts: string[],
    options: { truncate?: boolean; skipNormalize?: boolean } & CallInput = {},
  ): Promise<number[][]> {
    const response = await this.raw.embedding.embed(
      { inputs: strings("texts", texts), truncate: flag("truncate", options.truncate), skipNormalize: flag("skipNormalize", options.skipNormalize) },
      this.opts(options),
    );
    return response.embeddings.map((e) => Array.from(e.values));
  }

  /** The loaded model: id, dimension, limits, execution provider. */
  async modelInfo(options: CallInput = {}): Promise<GetModelInfoResponse> {
    return this.raw.embedding.getModelInfo({}, this.opts(options));
  }

  /** Creates or replaces items (atomic batch of 1 to 1000). */
  async upsertItems(items: ItemInput[], options: CallInput = {}): Promise<{ created: number; updated: number }> {
    const response = await this.raw.catalog.upsertItems(
      {
        items: records("items", items).map((i, at) =>
          create(ItemSchema, {
            id: text(`items[${at}].id`, i.id),
            text: text(`items[${at}].text`, i.text, ""),
            categories: strings(`items[${at}].categories`, i.categories),
            attributes: attributes(`items[${at}].attributes`, i.attributes),
            createTime: stamp("createTime", i.createTime),
            vector: wireVector(i.vector ?? []),
          }),
        ),
      },
      this.opts(options),
    );
    return { created: response.createdCount, updated: response.updatedCount };
  }

  /** Deletes items; returns how many existed. */
  async deleteItems(ids: string[], options: CallInput = {}): Promise<number> {
    return (await this.raw.catalog.deleteItems({ ids: strings("ids", ids) }, this.opts(options))).deletedCount;
  }

  /** Items by id, in the order of `ids` (NOT_FOUND when one is unknown). */
  async getItems(ids: string[], options: { includeVectors?: boolean } & CallInput = {}): Promise<StoredItem[]> {
    const response = await this.raw.catalog.getItems(
      { ids: strings("ids", ids), includeVectors: flag("includeVectors", options.includeVectors) },
      this.opts(options),
    );
    return response.items.map(storedItem);
  }

  /**
   * One page of the catalogue, in order of id: `nextPageToken` goes back as `pageToken` for the next page, and
   * is "" after the last. `pageSize` 0 (the default) is 100; more than 1000 is 1000.
   */
  async listItems(
    options: { pageSize?: number; pageToken?: string; includeVectors?: boolean } & CallInput = {},
  ): Promise<{ items: StoredItem[]; nextPageToken: string }> {
    const response = await this.raw.catalog.listItems(
      {
        pageSize: int32("pageSize", options.pageSize ?? 0),
        pageToken: text("pageToken", options.pageToken, ""),
        includeVectors: flag("includeVectors", options.includeVectors),
      },
      this.opts(options),
    );
    return { items: response.items.map(storedItem), nextPageToken: response.nextPageToken };
  }

  /** Every item of the catalogue, in order of id, a `listItems` page (of 1000 unless `pageSize`) at a time. */
  items(options: { pageSize?: number; includeVectors?: boolean } & CallInput = {}): AsyncGenerator<StoredItem> {
    const pageSize = options.pageSize ?? MAX_PAGE_SIZE;
    return paged(async (pageToken) => {
      const page = await this.listItems({ ...options, pageSize, pageToken });
      return [page.items, page.nextPageToken];
    });
  }

  /** Records events (atomic, idempotent by eventId, durable on return). */
  async recordEvents(
    events: EventInput[],
    options: CallInput = {},
  ): Promise<{ accepted: number; duplicates: number }> {
    const response = await this.raw.interest.recordEvents(
      {
        events: records("events", events).map((e, at) =>
          create(EventSchema, {
            eventId: text(`events[${at}].eventId`, e.eventId),
            userId: text(`events[${at}].userId`, e.userId),
            type: eventType(`events[${at}].type`, e.type),
            itemId: text(`events[${at}].itemId`, e.itemId, ""),
            text: text(`events[${at}].text`, e.text, ""),
            value: number(`events[${at}].value`, e.value),
            eventTime: stamp("eventTime", e.eventTime),
          }),
        ),
      },
      this.opts(options),
    );
    return { accepted: response.acceptedCount, duplicates: response.duplicateCount };
  }

  /** A user's interests at `asOf` (default now), strongest first. */
  async profile(
    userId: string,
    options: { asOf?: Date; itemsPerInterest?: number } & CallInput = {},
  ): Promise<GetProfileResponse> {
    return this.raw.interest.getProfile(
      { userId: text("userId", userId), asOfTime: stamp("asOf", options.asOf), itemsPerInterest: int32("itemsPerInterest", options.itemsPerInterest ?? 0) },
      this.opts(options),
    );
  }

  /**
   * One page of the events stored for a user, in the order recorded (`newestFirst`: the reverse), those whose
   * event time is in [`startTime`, `endTime`) where given: `nextPageToken` goes back as `pageToken` (with the
   * same user and `newestFirst`) for the next page, and is "" after the last. `pageSize` as `listItems`'.
   */
  async listEvents(
    userId: string,
    options: { pageSize?: number; pageToken?: string; newestFirst?: boolean } & EventTimeRange & CallInput = {},
  ): Promise<{ events: StoredEvent[]; nextPageToken: string }> {
    const response = await this.raw.interest.listEvents(
      {
        userId: text("userId", userId),
        pageSize: int32("pageSize", options.pageSize ?? 0),
        pageToken: text("pageToken", options.pageToken, ""),
        newestFirst: flag("newestFirst", options.newestFirst),
        startTime: stamp("startTime", options.startTime),
        endTime: stamp("endTime", options.endTime),
      },
      this.opts(options),
    );
    if (options.newestFirst && !response.newestFirst) {
      throw new ServerTooOldError("the server listed the events oldest first: it predates ListEvents' newestFirst (upgrade it)");
    }
    if ((options.startTime != null && !response.startTime) || (options.endTime != null && !response.endTime)) {
      throw new ServerTooOldError("the server listed the events of every time: it predates ListEvents' startTime and endTime (upgrade it)");
    }
    return { events: response.events.map(storedEvent), nextPageToken: response.nextPageToken };
  }

  /**
   * Every event stored for a user (in [`startTime`, `endTime`) where given), in the order recorded
   * (`newestFirst`: the reverse), a `listEvents` page (1000 unless `pageSize`) at a time.
   */
  events(userId: string, options: { pageSize?: number; newestFirst?: boolean } & EventTimeRange & CallInput = {}): AsyncGenerator<StoredEvent> {
    const pageSize = options.pageSize ?? MAX_PAGE_SIZE;
    return paged(async (pageToken) => {
      const page = await this.listEvents(userId, { ...options, pageSize, pageToken });
      return [page.events, page.nextPageToken];
    });
  }

  /** Erases a user; returns how many events were deleted. */
  async deleteUser(userId: string, options: CallInput = {}): Promise<bigint> {
    return (await this.raw.interest.deleteUser({ userId: text("userId", userId) }, this.opts(options))).deletedEventCount;
  }

  /** Top items for a user, best first. */
  async recommend(userId: string, options: RecommendOptions = {}): Promise<Recommendations> {
    const response = await this.raw.recommend.recommend(
      {
        userId: text("userId", userId),
        limit: int32("limit", options.limit ?? 10),
        asOfTime: stamp("asOf", options.asOf),
        filter: filter(options.filter),
        includeSeen: flag("includeSeen", options.includeSeen),
        query: text("query", options.query, ""),
        explain: flag("explain", options.explain),
        diversity: number("diversity", options.diversity, 0),
      },
      this.opts(options),
    );
    return { items: scored(response.items), strategy: response.strategy };
  }

  /** Items most similar to a catalogue item or to a text: give exactly one. */
  async similarItems(
    target: { itemId: string; text?: never } | { text: string; itemId?: never },
    options: { limit?: number; filter?: FilterInput } & CallInput = {},
  ): Promise<ScoredItem[]> {
    // By value, not by key: `{itemId: undefined, text}` went out as an empty item id, both as the item alone. null
    // is "not given" too, as for every optional field and the Python client's None: `{itemId, text: null}` was
    // refused as two targets.
    if (target == null || (target.itemId == null) === (target.text == null)) {
      throw new TypeError("give exactly one of itemId and text");
    }
    const response = await this.raw.recommend.similarItems(
      {
        target: target.itemId != null
          ? { case: "itemId", value: text("itemId", target.itemId) }
          : { case: "text", value: text("text", target.text) },
        limit: int32("limit", options.limit ?? 10),
        filter: filter(options.filter),
      },
      this.opts(options),
    );
    return scored(response.items);
  }

  /** Closes the HTTP/2 connection; later calls (`raw` ones too) fail with Code.Canceled. */
  close(): void {
    this.closed = true;
    this.sessions.abort();
  }
}
