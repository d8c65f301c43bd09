// A small Server-Sent Events parser, following the WHATWG HTML "event stream
// interpretation" rules (section 9.2.6), for streams read with fetch(): EventSource
// cannot POST.
//
//   const parser = new SSEParser((event) => { ... });  // {event, data, id}
//   parser.feed(textDecoder.decode(bytes, {stream: true}));  // as many times as needed
//
// - Lines end with CRLF, LF or CR; a CR at the end of one piece and an LF at the start
//   of the next are one line ending. Events may be split anywhere across feed() calls.
// - "field: value" (one space after the colon is dropped); a line without a colon is a
//   field with an empty value. Lines starting with ":" are comments (heartbeats).
// - `event` sets the type (default "message"), `data` lines are joined with "\n",
//   `id` sets the last event id (kept across events; ignored if it contains NUL),
//   `retry` and unknown fields are ignored (the page reconnects on its own schedule, with
//   `Last-Event-ID` set to the id of the last event it received).
// - A blank line dispatches the event; with no data nothing is dispatched. An event not
//   ended by a blank line when the stream ends is never dispatched. A leading BOM is dropped.

export class SSEParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.started = false;
    this.skipLF = false; // the last piece ended with CR: an LF starting the next one belongs to it
    this.data = "";
    this.eventType = "";
    this.lastEventId = "";
  }

  feed(text) {
    if (!text) return;
    if (!this.started) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.skipLF) {
      this.skipLF = false;
      if (text[0] === "\n") text = text.slice(1);
    }
    const buffer = this.buffer + text;
    let start = 0;
    for (;;) {
      const cr = buffer.indexOf("\r", start);
      const lf = buffer.indexOf("\n", start);
      if (cr === -1 && lf === -1) break;
      const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
      const line = buffer.slice(start, end);
      if (buffer[end] === "\r") {
        if (end + 1 < buffer.length) {
          start = buffer[end + 1] === "\n" ? end + 2 : end + 1;
        } else {
          start = end + 1;
          this.skipLF = true;
        }
      } else {
        start = end + 1;
      }
      this.processLine(line);
    }
    this.buffer = buffer.slice(start);
  }

  processLine(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line[0] === ":") return; // comment, e.g. ": ping"
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data += value + "\n";
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      default: // "retry" and anything unknown: ignored
        break;
    }
  }

  dispatch() {
    if (this.data === "") {
      this.eventType = "";
      return;
    }
    const event = {
      event: this.eventType || "message",
      data: this.data.slice(0, -1),
      id: this.lastEventId,
    };
    this.data = "";
    this.eventType = "";
    this.onEvent(event);
  }
}
