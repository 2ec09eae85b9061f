package gateway

import (
	"bufio"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// backendServer is a test backend and the Service (ClusterIP 127.0.0.1) in front of it.
func backendServer(t *testing.T, name string, handler http.HandlerFunc) *corev1.Service {
	server := httptest.NewServer(handler)
	t.Cleanup(server.Close)
	_, port, _ := net.SplitHostPort(server.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	return service(name, "127.0.0.1", int32(p))
}

func servicePort(s *corev1.Service) *int32 { return ptr(s.Spec.Ports[0].Port) }

func newGateway(t *testing.T, table *Table, list ...*corev1.Service) *httptest.Server {
	proxy := NewProxy(func() *Table { return table }, services(list...), rand.New(rand.NewPCG(5, 6)).IntN, t.Logf, nil)
	gw := httptest.NewServer(proxy)
	t.Cleanup(gw.Close)
	return gw
}

func TestProxyForwardsUnchanged(t *testing.T) {
	echo := backendServer(t, "echo", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Seen", r.Method+" "+r.URL.RequestURI()+" host="+r.Host+" h="+r.Header.Get("X-Custom")+
			" xff="+r.Header.Get("X-Forwarded-For"))
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write(append([]byte("got:"), body...))
	})
	table := &Table{Routes: []*Route{route("r", 0, nil, Rule{BackendRefs: []BackendRef{{Name: "echo", Port: servicePort(echo)}}})}}
	gw := newGateway(t, table, echo)

	req, _ := http.NewRequest("POST", gw.URL+"/v1/models/m:predict?x=1&y=%2F", strings.NewReader(`{"a":1}`))
	req.Host = "model.example.com"
	req.Header.Set("X-Custom", "kept")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	want := "POST /v1/models/m:predict?x=1&y=%2F host=model.example.com h=kept xff=127.0.0.1"
	if resp.StatusCode != http.StatusCreated || resp.Header.Get("X-Seen") != want || string(body) != `got:{"a":1}` {
		t.Fatalf("got %d %q %q", resp.StatusCode, resp.Header.Get("X-Seen"), body)
	}
}

func TestProxyStreams(t *testing.T) {
	release := make(chan struct{})
	stream := backendServer(t, "stream", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("first\n"))
		w.(http.Flusher).Flush()
		<-release
		_, _ = w.Write([]byte("second\n"))
	})
	table := &Table{Routes: []*Route{route("r", 0, nil, Rule{BackendRefs: []BackendRef{{Name: "stream", Port: servicePort(stream)}}})}}
	gw := newGateway(t, table, stream)
	resp, err := http.Get(gw.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	reader := bufio.NewReader(resp.Body)
	if line, err := reader.ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first line %q %v (before the backend finished)", line, err)
	}
	close(release)
	if rest, _ := io.ReadAll(reader); string(rest) != "second\n" {
		t.Fatalf("rest %q", rest)
	}
}

func TestProxyCanary(t *testing.T) {
	named := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, name) }
	}
	stable, canary := backendServer(t, "stable", named("stable")), backendServer(t, "canary", named("canary"))
	stableRef := BackendRef{Name: "stable", Port: servicePort(stable), Weight: ptr(int32(90))}
	canaryRef := BackendRef{Name: "canary", Port: servicePort(canary), Weight: ptr(int32(10))}
	pinned := canaryRef
	pinned.Weight = nil
	table := &Table{Routes: []*Route{route("m", 0, nil,
		Rule{Matches: []Match{header(prefix("/"), "x-recjob-revision", "rev-2")}, BackendRefs: []BackendRef{pinned}},
		Rule{BackendRefs: []BackendRef{stableRef, canaryRef}},
	)}}
	gw := newGateway(t, table, stable, canary)
	get := func(revision string) string {
		req, _ := http.NewRequest("GET", gw.URL+"/v1/models/m:predict", nil)
		if revision != "" {
			req.Header.Set("X-Recjob-Revision", revision)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	counts := map[string]int{}
	for range 1000 {
		counts[get("")]++
	}
	if counts["canary"] < 70 || counts["canary"] > 130 || counts["stable"]+counts["canary"] != 1000 {
		t.Errorf("90/10 split gave %v", counts)
	}
	for range 50 {
		if got := get("rev-2"); got != "canary" {
			t.Fatalf("pinned request went to %q", got)
		}
	}
}

func TestProxyErrors(t *testing.T) {
	closed := httptest.NewServer(http.NotFoundHandler())
	_, port, _ := net.SplitHostPort(closed.Listener.Addr().String())
	closed.Close()
	p, _ := strconv.Atoi(port)
	down := service("down", "127.0.0.1", int32(p))
	table := &Table{Routes: []*Route{route("r", 0, []string{"gw.test"},
		Rule{Matches: []Match{prefix("/zero")}, BackendRefs: []BackendRef{backend("down", ptr(int32(0)))}},
		Rule{Matches: []Match{prefix("/none")}},
		Rule{Matches: []Match{prefix("/unknown")}, BackendRefs: []BackendRef{backend("gone", nil)}},
		Rule{Matches: []Match{prefix("/foreign")}, BackendRefs: []BackendRef{{Name: "down", Namespace: ptr("other"), Port: ptr(int32(p))}}},
		Rule{Matches: []Match{prefix("/down")}, BackendRefs: []BackendRef{{Name: "down", Port: ptr(int32(p))}}},
	)}}
	gw := newGateway(t, table, down)
	for _, tc := range []struct {
		host, path string
		code       int
		says       string
	}{
		{"other.test", "/down", 404, "no HTTPRoute rule matches"},
		{"gw.test", "/elsewhere", 404, "no HTTPRoute rule matches"},
		{"gw.test", "/zero", 500, "no backendRef with a weight above 0"},
		{"gw.test", "/none", 500, "no backendRef with a weight above 0"},
		{"gw.test", "/unknown", 500, "Service ml/gone not found"},
		{"gw.test", "/foreign", 500, "Service other/down is in another namespace"},
		{"gw.test", "/down", 502, "unreachable"},
	} {
		req, _ := http.NewRequest("GET", gw.URL+tc.path, nil)
		req.Host = tc.host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.says) {
			t.Errorf("%s%s: %d %q, want %d saying %q", tc.host, tc.path, resp.StatusCode, body, tc.code, tc.says)
		}
	}
}
