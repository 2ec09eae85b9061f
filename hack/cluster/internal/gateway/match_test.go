package gateway

import (
	"net/http/httptest"
	"testing"
	"time"
)

func ptr[T any](v T) *T { return &v }

// route builds a route of namespace "ml" created at minute created.
func route(name string, created int, hostnames []string, rules ...Rule) *Route {
	return &Route{Namespace: "ml", Name: name, Created: time.Unix(int64(created)*60, 0),
		Spec: RouteSpec{Hostnames: hostnames, Rules: rules}}
}

func prefix(p string) Match { return Match{Path: &PathMatch{Type: ptr(PathPrefix), Value: ptr(p)}} }
func exact(p string) Match  { return Match{Path: &PathMatch{Type: ptr(Exact), Value: ptr(p)}} }
func header(m Match, name, value string) Match {
	m.Headers = append(m.Headers, ValueMatch{Name: name, Value: value})
	return m
}
func rule(matches ...Match) Rule { return Rule{Matches: matches} }

func TestSelect(t *testing.T) {
	canary := route("canary", 1, nil,
		rule(header(prefix("/"), "x-recjob-revision", "rev-2")), // rules[0]: pinned to the canary
		rule(), // rules[1]: the weighted default (no matches: PathPrefix "/")
	)
	hosts := route("hosts", 2, []string{"model.example.com", "*.models.example.com"}, rule(prefix("/v1")))
	paths := route("paths", 3, nil, rule(prefix("/v1/models")), rule(exact("/v1/models/m:predict")))
	older := route("b-older", 0, nil, rule(prefix("/tie")))
	newer := route("a-newer", 5, nil, rule(prefix("/tie")))
	sameAge1, sameAge2 := route("z", 7, nil, rule(prefix("/alpha"))), route("a", 7, nil, rule(prefix("/alpha")))
	methods := route("methods", 8, nil, rule(prefix("/m")), rule(Match{Path: &PathMatch{Value: ptr("/m")}, Method: ptr("POST")}))
	queries := route("queries", 9, nil, rule(prefix("/q")), rule(Match{Path: prefix("/q").Path, QueryParams: []ValueMatch{{Name: "v", Value: "2"}}}))
	table := &Table{Routes: []*Route{canary, hosts, paths, newer, older, sameAge1, sameAge2, methods, queries}}

	tests := []struct {
		name, method, target, host string
		headers                    map[string]string
		route                      *Route
		rule                       int
	}{
		{"header rule beats the default rule", "GET", "/v1/predict", "gw", map[string]string{"X-Recjob-Revision": "rev-2"}, canary, 0},
		{"header names are case-insensitive", "GET", "/x", "gw", map[string]string{"x-RECJOB-revision": "rev-2"}, canary, 0},
		{"header values are not", "GET", "/x", "gw", map[string]string{"x-recjob-revision": "REV-2"}, canary, 1},
		{"no header: the default rule", "GET", "/x", "gw", nil, canary, 1},
		{"exact path beats any prefix", "GET", "/v1/models/m:predict", "gw", nil, paths, 1},
		{"longer prefix beats shorter", "GET", "/v1/models/other", "gw", nil, paths, 0},
		{"prefix is element-wise", "GET", "/v1/modelsX", "gw", nil, canary, 1},
		{"prefix matches the element itself", "GET", "/v1/models", "gw", nil, paths, 0},
		{"exact host beats routes without hostnames", "GET", "/v1/models/m:predict", "model.example.com:8081", nil, hosts, 0},
		{"wildcard host", "GET", "/v1/x", "A.b.MODELS.example.com", nil, hosts, 0},
		{"wildcard needs a label", "GET", "/v1/x", "models.example.com", nil, canary, 1},
		{"host route does not match other paths", "GET", "/v2", "model.example.com", nil, canary, 1},
		{"older route wins a tie", "GET", "/tie/x", "gw", nil, older, 0},
		{"then namespace/name order", "GET", "/alpha", "gw", nil, sameAge2, 0},
		{"method match beats none", "POST", "/m", "gw", nil, methods, 1},
		{"method mismatch", "GET", "/m", "gw", nil, methods, 0},
		{"query param match", "GET", "/q?v=2", "gw", nil, queries, 1},
		{"query param mismatch", "GET", "/q?v=3", "gw", nil, queries, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, "http://"+tc.host+tc.target, nil)
			for k, v := range tc.headers {
				req.Header.Set(k, v)
			}
			sel, ok := table.Select(req)
			if !ok {
				t.Fatalf("no route for %s %s", tc.method, tc.target)
			}
			if sel.Route != tc.route || sel.Rule != tc.rule {
				t.Fatalf("got %s rules[%d], want %s rules[%d]", sel.Route.Key(), sel.Rule, tc.route.Key(), tc.rule)
			}
		})
	}
}

func TestSelectNoRoute(t *testing.T) {
	table := &Table{Routes: []*Route{
		route("hosts", 1, []string{"model.example.com", "*.example.org"}, rule()),
		route("exact", 2, nil, rule(exact("/only"))),
	}}
	for _, tc := range []struct{ host, path string }{
		{"other.example.com", "/"}, // host mismatch
		{"example.org", "/"},       // the wildcard wants one more label
		{"model.example.com.evil", "/"},
		{"gw", "/only/"}, // Exact is exact
		{"gw", "/"},
	} {
		req := httptest.NewRequest("GET", "http://"+tc.host+tc.path, nil)
		if sel, ok := table.Select(req); ok {
			t.Errorf("%s%s: matched %s rules[%d], want no route", tc.host, tc.path, sel.Route.Key(), sel.Rule)
		}
	}
	if _, ok := (&Table{}).Select(httptest.NewRequest("GET", "/", nil)); ok {
		t.Error("an empty table matched")
	}
}

func TestMatchPath(t *testing.T) {
	for _, tc := range []struct {
		kind, value, path string
		want              bool
	}{
		{PathPrefix, "/", "/anything", true},
		{PathPrefix, "/abc", "/abc", true},
		{PathPrefix, "/abc", "/abc/", true},
		{PathPrefix, "/abc", "/abc/def", true},
		{PathPrefix, "/abc/", "/abc", true}, // a trailing "/" of the value is ignored
		{PathPrefix, "/abc", "/abcd", false},
		{Exact, "/abc", "/abc", true},
		{Exact, "/abc", "/abc/", false},
		{"RegularExpression", "/.*", "/abc", false},
	} {
		if got := matchPath(tc.kind, tc.value, tc.path); got != tc.want {
			t.Errorf("%s %q vs %q: %v, want %v", tc.kind, tc.value, tc.path, got, tc.want)
		}
	}
}
