// Money on the chat page: amounts arrive from the API as decimal strings with 6 places and
// are shown at 2 (the exact amount goes in a tooltip, see chat.js), and the 402 message.
//
//   money("9.876543") === "9.87"; money("0.000001", "up") === "0.01"
//   notEnoughCredits("This turn needs 0.041200 credits (...); 0.030000 are available.")
//     === "Not enough credits for this message. It needs 0.05 credits and 0.03 are available. ..."

// Money comes from the API as a decimal string with 6 places ("9.876543"). It is shown at 2
// places, never in the user's favour: what the wallet has rounds down, what something needs
// rounds up. The exact value goes in a tooltip. Integer arithmetic (BigInt), no floats.
export function money(value, direction = "down") {
  const match = /^(-?)(\d+)(?:\.(\d*))?$/.exec(String(value).trim());
  if (!match) return String(value);
  const [, sign, whole, frac = ""] = match;
  const scale = 10n ** BigInt(frac.length);
  const units = BigInt(whole + frac) * (sign ? -1n : 1n);
  let cents = (units * 100n) / scale; // truncated towards zero
  const exact = cents * scale === units * 100n;
  if (!exact && direction === "down" && units < 0n) cents -= 1n;
  if (!exact && direction === "up" && units > 0n) cents += 1n;
  const negative = cents < 0n;
  const abs = negative ? -cents : cents;
  return `${negative ? "-" : ""}${abs / 100n}.${String(abs % 100n).padStart(2, "0")}`;
}

// The amounts of a 402: its body's `needed` and `available` fields, else read from its
// detail: "This turn needs N credits (...); M are available." or "Your wallet has no
// available credits (M)." Either may be missing (null). `problem` is the body or the detail.
export function creditAmounts(problem) {
  if (problem && typeof problem === "object") {
    const fromText = creditAmounts(problem.detail);
    const field = (value) => (typeof value === "string" && value ? value : null);
    return { needed: field(problem.needed) ?? fromText.needed, available: field(problem.available) ?? fromText.available };
  }
  const text = String(problem || "");
  const needed = /needs (-?\d+(?:\.\d+)?) credits/.exec(text);
  const available = /(-?\d+(?:\.\d+)?) (?:are|is) available/.exec(text)
    || /no available credits \((-?\d+(?:\.\d+)?)\)/.exec(text);
  return { needed: needed ? needed[1] : null, available: available ? available[1] : null };
}

// The 402 message, in plain sentences: what the message needs, what the wallet has.
export function notEnoughCredits(problem, availableFallback = null) {
  const { needed, available = null } = creditAmounts(problem);
  const have = available ?? availableFallback;
  const parts = ["Not enough credits for this message."];
  if (needed !== null && have !== null) {
    parts.push(`It needs ${money(needed, "up")} credits and ${money(have)} are available.`);
  } else if (needed !== null) {
    parts.push(`It needs ${money(needed, "up")} credits.`);
  } else if (have !== null) {
    parts.push(`Your wallet has ${money(have)} credits available.`);
  }
  parts.push("Ask an administrator to grant you credits.");
  return parts.join(" ");
}
