// Usage: settled LLM tokens and compute seconds per day, with their cost.
import { call } from "./api";
import { h, status } from "./dom";

export function usagePage(root: HTMLElement) {
  const note = h("p", { class: "status", role: "status" }, "Loading…");
  const body = h("tbody");
  root.replaceChildren(h("section", {}, h("h2", {}, "Usage"), note,
    h("table", {}, h("caption", {}, "Your usage, last 30 days"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Day"), h("th", { scope: "col" }, "Resource"),
        h("th", { scope: "col" }, "Amount"), h("th", { scope: "col" }, "Cost"))), body)));
  call(`{ usage(scope: ME) { day resource amount cost } }`)
    .then((data) => {
      body.replaceChildren(...data.usage.map((u: any) =>
        h("tr", {}, h("td", {}, u.day), h("td", {}, u.resource), h("td", {}, u.amount.toFixed(2)), h("td", {}, u.cost.toFixed(4)))));
      status(note, data.usage.length ? "" : "Nothing used yet.");
    })
    .catch((e) => status(note, (e as Error).message, "error"));
}
