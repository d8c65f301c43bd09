// The /api/docs/ page: Swagger UI over the schema named by #swagger-ui's data-schema-url.
// "Try it out" works with an API key (Authorize: bearerAuth) or the browser's session; a
// session's writes carry the CSRF token from the `csrftoken` cookie, as the chat page's do.
"use strict";

(function () {
  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : null;
  }

  const root = document.getElementById("swagger-ui");
  window.ui = window.SwaggerUIBundle({
    url: root.dataset.schemaUrl,
    domNode: root,
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null, // no request to an outside validator
    persistAuthorization: false,
    requestInterceptor: function (request) {
      const method = (request.method || "GET").toUpperCase();
      const token = csrfToken();
      if (token && !["GET", "HEAD", "OPTIONS", "TRACE"].includes(method)) {
        request.headers["X-CSRFToken"] = token;
      }
      return request;
    },
  });
})();
