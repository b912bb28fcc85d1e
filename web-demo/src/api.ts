// The GraphQL client an app developer would use: urql for queries and mutations (multipart
// uploads included) and graphql-ws (graphql-transport-ws) for subscriptions.
import { Client, cacheExchange, fetchExchange, subscriptionExchange } from "@urql/core";
import { createClient as createWsClient, type Client as WsClient } from "graphql-ws";
import { onEnd, pipe, subscribe } from "wonka";

const TOKEN = "sightline.token";

export function token(): string | null {
  return sessionStorage.getItem(TOKEN);
}

export function signOut() {
  sessionStorage.removeItem(TOKEN);
  location.hash = "#/";
  location.reload();
}

export async function signIn(tenant: string, email: string, password: string): Promise<void> {
  const body = new URLSearchParams({ grant_type: "password", tenant, username: email, password });
  const response = await fetch("/oauth/token", { method: "POST", body });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error_description || data.error || "sign-in failed");
  sessionStorage.setItem(TOKEN, data.access_token);
}

export type Connection = "connecting" | "connected" | "reconnecting";
const listeners = new Set<(state: Connection) => void>();
export function onConnection(listener: (state: Connection) => void) {
  listeners.add(listener);
}

let ws: WsClient | null = null;
let client: Client | null = null;

export function api(): Client {
  if (client) return client;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let everConnected = false;
  ws = createWsClient({
    url: `${scheme}://${location.host}/graphql`,
    connectionParams: () => ({ authorization: `Bearer ${token()}` }),
    retryAttempts: Infinity,
    shouldRetry: () => true,
    retryWait: async (tries) => new Promise((r) => setTimeout(r, Math.min(4000, 250 * 2 ** tries))),
    on: {
      connecting: () => listeners.forEach((l) => l(everConnected ? "reconnecting" : "connecting")),
      connected: () => {
        everConnected = true;
        listeners.forEach((l) => l("connected"));
      },
      closed: () => listeners.forEach((l) => l("reconnecting")),
    },
  });
  const socket = ws;
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

/** Drops the socket (what a flaky network does); the client reconnects and streams resume. */
export function dropConnection() {
  ws?.terminate();
}

export function errorText(error: unknown): string {
  const e = error as { graphQLErrors?: { message: string; extensions?: { code?: string } }[]; message?: string };
  const first = e?.graphQLErrors?.[0];
  if (first) return `${first.extensions?.code ?? "ERROR"}: ${first.message}`;
  return e?.message ?? String(error);
}

/** One query or mutation; throws with the GraphQL error's code and message. */
export async function call<T = any>(query: string, variables: Record<string, unknown> = {}): Promise<T> {
  const result = await api().mutation(query, variables).toPromise();
  if (result.error) throw new Error(errorText(result.error));
  return result.data as T;
}

/** A subscription's events until it completes (or `stop()` is called). */
export function follow<T = any>(
  query: string,
  variables: Record<string, unknown>,
  next: (data: T) => void,
  done: (error?: string) => void,
): { stop: () => void } {
  let failed = false;
  const { unsubscribe } = pipe(
    api().subscription(query, variables),
    onEnd(() => {
      if (!failed) done();
    }),
    subscribe((result) => {
      if (result.error) {
        failed = true;
        done(errorText(result.error));
      } else if (result.data) next(result.data as T);
    }),
  );
  return { stop: unsubscribe };
}
