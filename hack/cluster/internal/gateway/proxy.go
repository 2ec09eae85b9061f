package gateway

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

// Proxy is the data plane: it matches each request against the current Table, picks a
// backend of the matched rule by weight and proxies the request to it unchanged (path,
// query, body, headers and Host; X-Forwarded-For/-Host/-Proto added as gateways do),
// streaming the response back as it comes.
//
// Answers of its own, each with a text body saying why: 404 when no rule matches, 500 when
// the rule has no backend with a weight above 0 or the picked backendRef cannot be
// resolved (the Gateway API's rule for invalid backends), 502 when the backend is
// unreachable.
type Proxy struct {
	table    func() *Table
	services Services
	intn     Intn
	logf     func(format string, args ...any)
	proxy    *httputil.ReverseProxy
}

type targetKey struct{}

// NewProxy makes the handler. table returns the routes in force (it is called once per
// request); services looks Services up; intn is the random source of the weighted choice;
// logf logs the gateway's own errors. transport nil means a plain HTTP transport.
func NewProxy(table func() *Table, services Services, intn Intn, logf func(string, ...any),
	transport http.RoundTripper) *Proxy {
	if transport == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.Proxy = nil // never an HTTP_PROXY of the environment: backends are ClusterIPs
		t.MaxIdleConnsPerHost = 64
		t.ResponseHeaderTimeout = 5 * time.Minute
		transport = t
	}
	p := &Proxy{table: table, services: services, intn: intn, logf: logf}
	p.proxy = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(r.In.Context().Value(targetKey{}).(*url.URL))
			r.Out.Host = r.In.Host // a gateway forwards the Host header unmodified
			r.Out.Header["X-Forwarded-For"] = r.In.Header["X-Forwarded-For"]
			r.SetXForwarded()
		},
		Transport:     transport,
		FlushInterval: -1, // stream: flush every write of the backend at once
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			target := req.Context().Value(targetKey{}).(*url.URL)
			p.fail(w, http.StatusBadGateway, "backend %s unreachable for %s %s: %v",
				target.Host, req.Method, req.URL.Path, err)
		},
	}
	return p
}

// ServeHTTP routes one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	sel, ok := p.table().Select(req)
	if !ok {
		p.fail(w, http.StatusNotFound, "no HTTPRoute rule matches %s %s (host %q)", req.Method, req.URL.Path, req.Host)
		return
	}
	rule := sel.Route.Spec.Rules[sel.Rule]
	i, ok := Pick(rule.BackendRefs, p.intn)
	if !ok {
		p.fail(w, http.StatusInternalServerError,
			"HTTPRoute %s rules[%d] has no backendRef with a weight above 0", sel.Route.Key(), sel.Rule)
		return
	}
	address, refErr := Resolve(sel.Route.Namespace, rule.BackendRefs[i], p.services)
	if refErr != nil {
		p.fail(w, http.StatusInternalServerError, "HTTPRoute %s rules[%d].backendRefs[%d]: %s",
			sel.Route.Key(), sel.Rule, i, refErr.Message)
		return
	}
	target := &url.URL{Scheme: "http", Host: address}
	p.proxy.ServeHTTP(w, req.WithContext(context.WithValue(req.Context(), targetKey{}, target)))
}

// fail answers with the gateway's own error, as text, and logs it.
func (p *Proxy) fail(w http.ResponseWriter, code int, format string, args ...any) {
	message := fmt.Sprintf(format, args...)
	p.logf("%d: %s", code, message)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	fmt.Fprintf(w, "recjob-gateway: %s\n", message)
}
