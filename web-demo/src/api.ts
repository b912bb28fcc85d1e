// The GraphQL client an app developer would use: urql for queries and mutations (multipart
// uploads included) and graphql-ws (graphql-transport-ws) for subscriptions.
//
// A session is an access token (short-lived) and a refresh token: the access token is renewed
// before it expires (and when the server says it has), and streams survive both a dropped
// socket and an expired one by subscribing again after the last event they saw.
import { Client, cacheExchange, fetchExchange, subscriptionExchange } from "@urql/core";
import { createClient as createWsClient, type Client as WsClient } from "graphql-ws";

const TOKEN = "sightline.token";
const REFRESH = "sightline.refresh";
const ISSUED = "sightline.issued"; // ms since the epoch, as this browser saw it
const EXPIRES = "sightline.expires";

export function token(): string | null {
  return sessionStorage.getItem(TOKEN);
}

type Tokens = { access_token: string; expires_in: number; refresh_token?: string | null };

function store(data: Tokens) {
  const now = Date.now();
  sessionStorage.setItem(TOKEN, data.access_token);
  sessionStorage.setItem(ISSUED, String(now));
  sessionStorage.setItem(EXPIRES, String(now + data.expires_in * 1000));
  if (data.refresh_token) sessionStorage.setItem(REFRESH, data.refresh_token);
  scheduleRefresh();
}

function forget() {
  for (const key of [TOKEN, REFRESH, ISSUED, EXPIRES]) sessionStorage.removeItem(key);
  clearTimeout(refreshTimer);
}

const signedOutListeners = new Set<(reason: string) => void>();
/** Called when the session ends on its own (the server refused its refresh token, or its
 * access token for a reason other than expiry: revoked). */
export function onSignedOut(listener: (reason: string) => void) {
  signedOutListeners.add(listener);
}

export function signOut() {
  const refresh = sessionStorage.getItem(REFRESH);
  if (refresh) {
    // ends the session on the server too (its access tokens stop working at once)
    void fetch("/oauth/revoke", { method: "POST", body: new URLSearchParams({ token: refresh }), keepalive: true }).catch(() => {});
  }
  forget();
  location.hash = "#/";
  location.reload();
}

export async function signIn(tenant: string, email: string, password: string): Promise<void> {
  const body = new URLSearchParams({ grant_type: "password", tenant, username: email, password });
  const response = await fetch("/oauth/token", { method: "POST", body });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error_description || data.error || "sign-in failed");
  store(data);
}

let refreshTimer: ReturnType<typeof setTimeout> | undefined;
let refreshing: Promise<boolean> | null = null;

/** Renews the access token with the refresh token (rotated by the server). True when renewed;
 * false when the session has ended (then the page is signed out) or the server is unreachable
 * or busy (then it tries again a little later). Concurrent callers share one request. */
export function refreshSession(): Promise<boolean> {
  refreshing ??= (async () => {
    const refresh = sessionStorage.getItem(REFRESH);
    if (!refresh) {
      endSession("signed in without a refresh token");
      return false;
    }
    let response: Response;
    try {
      const body = new URLSearchParams({ grant_type: "refresh_token", refresh_token: refresh });
      response = await fetch("/oauth/token", { method: "POST", body });
    } catch {
      retryRefreshSoon();
      return false;
    }
    const data = await response.json().catch(() => ({}));
    if (response.ok) {
      store(data);
      return true;
    }
    if (response.status >= 500 || response.status === 429) {
      retryRefreshSoon();
      return false;
    }
    endSession(data.error_description || data.error || "the session has ended");
    return false;
  })().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

function endSession(reason: string) {
  if (!token()) return;
  forget();
  ws?.terminate(); // its token is no good any more; streams give up (see follow)
  signedOutListeners.forEach((l) => l(reason));
}

function retryRefreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => void refreshSession(), 5_000);
}

/** Renews the access token when three quarters of its lifetime have passed. */
function scheduleRefresh() {
  clearTimeout(refreshTimer);
  const issued = Number(sessionStorage.getItem(ISSUED));
  const expires = Number(sessionStorage.getItem(EXPIRES));
  if (!token() || !issued || !expires || !sessionStorage.getItem(REFRESH)) return;
  const at = issued + 0.75 * (expires - issued);
  refreshTimer = setTimeout(() => void refreshSession(), Math.max(0, at - Date.now()));
}
scheduleRefresh(); // a page loaded with a session already open

/** The access token, renewed first when it has (nearly) expired. */
async function freshToken(): Promise<string | null> {
  const expires = Number(sessionStorage.getItem(EXPIRES));
  if (token() && expires && expires - Date.now() < 5_000) await refreshSession();
  return token();
}

function isExpiry(errors: readonly { message: string; extensions?: { code?: unknown } }[] | undefined): boolean {
  const first = errors?.[0];
  return first?.extensions?.code === "UNAUTHENTICATED" && /expired/i.test(first.message);
}

export type Connection = "connecting" | "connected" | "reconnecting";
const listeners = new Set<(state: Connection) => void>();
export function onConnection(listener: (state: Connection) => void) {
  listeners.add(listener);
}

let ws: WsClient | null = null;
let client: Client | null = null;
let connected = false;
let socketToken: string | null = null; // the token the current socket signed in with
// Why the server refused the current socket's credential (a `connection_error` before closing
// it with 4403): graphql-ws drops that message, so it is read off the socket itself.
let refused: GraphQLError | null = null;

function sockets(): WsClient {
  if (ws) return ws;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let everConnected = false;
  ws = createWsClient({
    url: `${scheme}://${location.host}/graphql`,
    connectionParams: async () => {
      socketToken = await freshToken();
      return { authorization: `Bearer ${socketToken}` };
    },
    // No retries inside graphql-ws: a lost socket fails its subscriptions and `follow` subscribes
    // again, after the last event each one saw (graphql-ws would repeat the first request, and a
    // lazy client whose subscriptions were given up never opens another socket).
    retryAttempts: 0,
    on: {
      connecting: () => {
        refused = null;
        listeners.forEach((l) => l(everConnected ? "reconnecting" : "connecting"));
      },
      opened: (socket) => {
        (socket as WebSocket).addEventListener("message", ({ data }) => {
          if (typeof data !== "string" || !data.includes('"connection_error"')) return;
          try {
            const message = JSON.parse(data);
            const payload = message?.payload ?? {};
            if (message?.type === "connection_error") {
              refused = { message: String(payload.message ?? "refused"), extensions: { code: payload.code } };
            }
          } catch {
            // not ours to judge: graphql-ws reports a bad message itself
          }
        });
      },
      connected: () => {
        everConnected = true;
        connected = true;
        listeners.forEach((l) => l("connected"));
      },
      closed: () => {
        if (!connected) return;
        connected = false;
        listeners.forEach((l) => l("reconnecting"));
      },
    },
  });
  return ws;
}

export function api(): Client {
  if (client) return client;
  const socket = sockets();
  client = new Client({
    url: "/graphql",
    exchanges: [
      cacheExchange,
      fetchExchange,
      subscriptionExchange({
        forwardSubscription(request) {
          const input = { ...request, query: request.query || "" };
          return {
            subscribe(sink) {
              const unsubscribe = socket.subscribe(input, sink);
              return { unsubscribe };
            },
          };
        },
      }),
    ],
    requestPolicy: "network-only",
    // JSON only over HTTP (subscriptions go over graphql-ws). The server also honours the
    // order of urql's default Accept, but saying so costs nothing.
    fetchOptions: () => ({
      headers: {
        authorization: `Bearer ${token()}`,
        accept: "application/graphql-response+json, application/json",
      },
    }),
  });
  return client;
}

/** Drops the socket (what a flaky network does); streams resume on a new one. */
export function dropConnection() {
  ws?.terminate();
}

type GraphQLError = { message: string; extensions?: { code?: string } };

export function errorText(error: unknown): string {
  const e = error as { graphQLErrors?: GraphQLError[]; message?: string };
  const first = Array.isArray(error) ? (error[0] as GraphQLError) : e?.graphQLErrors?.[0];
  if (first) return `${first.extensions?.code ?? "ERROR"}: ${first.message}`;
  return e?.message ?? String(error);
}

/** One query or mutation; throws with the GraphQL error's code and message. An expired access
 * token is renewed and the call made once more. */
export async function call<T = any>(query: string, variables: Record<string, unknown> = {}): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    const used = await freshToken();
    const result = await api().mutation(query, variables).toPromise();
    const errors = result.error?.graphQLErrors;
    if (attempt === 0 && isExpiry(errors)) {
      if (token() !== used || (await refreshSession())) continue;
    } else if (errors?.[0]?.extensions?.code === "UNAUTHENTICATED" && used && token() === used) {
      endSession(errors[0].message); // revoked: the header must not say "Signed in"
    }
    if (result.error) throw new Error(errorText(result.error));
    return result.data as T;
  }
}

/** How `follow` resumes a stream: the variable that takes the cursor (default `after`), the
 * cursor of an event, and what to show while the stream is away. */
export type Resume<T> = {
  cursor: (data: T) => string | null | undefined;
  variable?: string;
  lost?: () => void;
  resumed?: (cursor: string | null) => void;
};

/** A subscription's events until it completes (or `stop()` is called). With `resume`, a lost
 * socket or an expired token does not end it: it subscribes again (on a new socket, with a
 * renewed token) after the last event it saw. */
export function follow<T = any>(
  query: string,
  variables: Record<string, unknown>,
  next: (data: T) => void,
  done: (error?: string) => void,
  resume?: Resume<T>,
): { stop: () => void } {
  const socket = sockets();
  let stopped = false;
  let cursor: string | null = resume ? ((variables[resume.variable ?? "after"] as string | null) ?? null) : null;
  let dispose: () => void = () => {};
  let timer: ReturnType<typeof setTimeout> | undefined;
  let tries = 0;
  let away = false; // lost the stream; `resumed` is due when it is back
  let expiries = 0; // token expiries in a row, without an event between

  function back() {
    if (!away) return;
    away = false;
    tries = 0;
    resume?.resumed?.(cursor);
  }

  function start() {
    if (stopped) return;
    if (!token()) {
      stopped = true; // signed out: nothing to resume with
      return done("signed out");
    }
    const vars = resume ? { ...variables, [resume.variable ?? "after"]: cursor } : variables;
    let ended = false;
    const offConnected = socket.on("connected", back);
    if (connected) queueMicrotask(back);
    const leave = (): boolean => {
      if (ended) return false;
      ended = true;
      offConnected();
      dispose(); // releases graphql-ws's hold on the socket
      return !stopped;
    };
    const fail = (errors: readonly GraphQLError[]) => {
      const stale = socketToken; // the token of the socket that said so
      if (!leave()) return;
      if (resume && isExpiry(errors) && expiries < 2) {
        expiries += 1;
        return void renew(stale).then(retry);
      }
      stopped = true;
      done(errorText(errors));
      if (errors[0]?.extensions?.code === "UNAUTHENTICATED" && !isExpiry(errors) && stale === token()) {
        endSession(errors[0].message); // revoked: the header must not say "Signed in"
      }
    };
    dispose = socket.subscribe<T>({ query, variables: vars }, {
      next(result) {
        if (result.errors?.length) return fail(result.errors as GraphQLError[]);
        back();
        expiries = 0;
        tries = 0;
        if (!result.data) return;
        if (resume) cursor = resume.cursor(result.data as T) ?? cursor;
        next(result.data as T);
      },
      complete() {
        if (!leave()) return;
        stopped = true;
        done();
      },
      error(error) {
        if (Array.isArray(error)) return fail(error as GraphQLError[]);
        if (refused) return fail([refused]); // the socket's credential was refused
        // the socket closed (dropped, or could not open): subscribe again
        if (!leave()) return;
        if (!away) {
          away = true;
          resume?.lost?.();
        }
        retry();
      },
    });
  }

  function retry() {
    if (stopped) return;
    clearTimeout(timer);
    timer = setTimeout(start, tries === 0 ? 0 : Math.min(4000, 250 * 2 ** tries));
    tries += 1;
  }

  start();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      dispose();
    },
  };
}

/** The server ended a stream because the socket's token (`stale`) expired: renew the token
 * unless that has happened already, and replace a socket still signed in with the old one. */
async function renew(stale: string | null): Promise<void> {
  if (stale !== null && token() === stale) await refreshSession();
  if (connected && socketToken === stale && token() !== stale) ws?.terminate();
}
