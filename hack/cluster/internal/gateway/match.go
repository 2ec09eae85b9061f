package gateway

import (
	"net"
	"net/http"
	"strings"
)

// Path match types and the one header/query match type implemented.
const (
	PathPrefix = "PathPrefix"
	Exact      = "Exact"
)

// Table is the routes attached to the Gateway and accepted, as one request sees them.
type Table struct {
	Routes []*Route
}

// Selection is the rule a request matched: Route.Spec.Rules[Rule].
type Selection struct {
	Route *Route
	Rule  int
}

// rank is what orders the (route, rule, match) triples a request matches, best first,
// in the Gateway API's order (HTTPRouteSpec.hostnames, HTTPRouteRule.matches).
type rank struct {
	hostExact, hostAny int // characters of the matching non-wildcard / any hostname
	exact              bool
	pathLen            int
	method             bool
	headers, queries   int
	route              *Route
	rule               int
}

// before tells whether a takes precedence over b.
func (a rank) before(b rank) bool {
	switch {
	case a.hostExact != b.hostExact:
		return a.hostExact > b.hostExact
	case a.hostAny != b.hostAny:
		return a.hostAny > b.hostAny
	case a.exact != b.exact:
		return a.exact
	case a.pathLen != b.pathLen:
		return a.pathLen > b.pathLen
	case a.method != b.method:
		return a.method
	case a.headers != b.headers:
		return a.headers > b.headers
	case a.queries != b.queries:
		return a.queries > b.queries
	case a.route != b.route:
		if !a.route.Created.Equal(b.route.Created) {
			return a.route.Created.Before(b.route.Created)
		}
		return a.route.Key() < b.route.Key()
	}
	return a.rule < b.rule
}

// Select finds the rule that serves req, if any (none: the Gateway answers 404).
func (t *Table) Select(req *http.Request) (Selection, bool) {
	host := requestHost(req.Host)
	var best *rank
	for _, route := range t.Routes {
		hostExact, hostAny, ok := matchHost(route.Spec.Hostnames, host)
		if !ok {
			continue
		}
		for i, rule := range route.Spec.Rules {
			matches := rule.Matches
			if len(matches) == 0 {
				matches = []Match{{}} // the default: PathPrefix "/"
			}
			for _, m := range matches {
				r, ok := matchRequest(m, req)
				if !ok {
					continue
				}
				r.hostExact, r.hostAny, r.route, r.rule = hostExact, hostAny, route, i
				if best == nil || r.before(*best) {
					best = &r
				}
			}
		}
	}
	if best == nil {
		return Selection{}, false
	}
	return Selection{Route: best.route, Rule: best.rule}, true
}

// requestHost is the Host header without port, lower case, without a trailing dot.
func requestHost(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return strings.TrimSuffix(strings.ToLower(host), ".")
}

// matchHost matches host against a route's hostnames (none: every host matches), and
// returns the lengths of the best matching exact hostname and of any matching hostname.
func matchHost(hostnames []string, host string) (exactLen, anyLen int, ok bool) {
	if len(hostnames) == 0 {
		return 0, 0, true
	}
	for _, h := range hostnames {
		h = strings.ToLower(h)
		switch {
		case strings.HasPrefix(h, "*."):
			suffix := h[1:] // ".example.com": one or more labels before it
			if strings.HasSuffix(host, suffix) && len(host) > len(suffix) {
				ok, anyLen = true, max(anyLen, len(h))
			}
		case h == host:
			ok, exactLen, anyLen = true, max(exactLen, len(h)), max(anyLen, len(h))
		}
	}
	return exactLen, anyLen, ok
}

// matchRequest tests one HTTPRouteMatch; on success the rank holds its specificity.
func matchRequest(m Match, req *http.Request) (rank, bool) {
	var r rank
	kind, value := PathPrefix, "/"
	if m.Path != nil {
		kind, value = deref(m.Path.Type, PathPrefix), deref(m.Path.Value, "/")
	}
	if !matchPath(kind, value, req.URL.Path) {
		return r, false
	}
	r.exact, r.pathLen = kind == Exact, len(value)
	if m.Method != nil {
		if req.Method != *m.Method {
			return r, false
		}
		r.method = true
	}
	seen := map[string]bool{}
	for _, h := range m.Headers {
		name := http.CanonicalHeaderKey(h.Name)
		if seen[name] {
			continue // the first entry of a name counts, later ones are ignored
		}
		seen[name] = true
		values, present := req.Header[name]
		if !present || strings.Join(values, ",") != h.Value {
			return r, false
		}
		r.headers++
	}
	query, seenQuery := req.URL.Query(), map[string]bool{}
	for _, q := range m.QueryParams {
		if seenQuery[q.Name] {
			continue
		}
		seenQuery[q.Name] = true
		if values, present := query[q.Name]; !present || values[0] != q.Value {
			return r, false
		}
		r.queries++
	}
	return r, true
}

// matchPath: Exact compares the whole path; PathPrefix compares path elements, so "/abc"
// matches "/abc", "/abc/" and "/abc/def" but not "/abcd" (a trailing "/" of the value is
// ignored).
func matchPath(kind, value, path string) bool {
	if path == "" {
		path = "/"
	}
	switch kind {
	case Exact:
		return path == value
	case PathPrefix:
		prefix := strings.TrimSuffix(value, "/")
		return path == prefix || strings.HasPrefix(path, prefix+"/")
	}
	return false
}
