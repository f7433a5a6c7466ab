package halflife_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	halflife "github.com/halflife/halflife/clients/go"
	pb "github.com/halflife/halflife/clients/go/halflifev1"
)

func connect(t *testing.T) (*halflife.Client, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	c, err := halflife.Dial(ctx, address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, ctx
}

func dot(a, b []float32) (s float64) {
	for i := range a {
		s += float64(a[i]) * float64(b[i])
	}
	return s
}

func TestEmbed(t *testing.T) {
	c, ctx := connect(t)
	info, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.ModelId != "sentence-transformers/all-MiniLM-L6-v2" || info.Dimension != 384 {
		t.Fatalf("unexpected model %v", info)
	}
	v, err := c.Embed(ctx, []string{"trail running shoes", "hiking boots for the mountains", "a recipe for fresh pasta"})
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 3 || len(v[0]) != 384 || len(v[1]) != 384 || len(v[2]) != 384 {
		t.Fatalf("got %d vectors, want 3 of 384", len(v))
	}
	if math.Abs(dot(v[0], v[0])-1) > 1e-4 {
		t.Errorf("not unit length: %v", dot(v[0], v[0]))
	}
	if dot(v[0], v[1]) <= dot(v[0], v[2]) {
		t.Errorf("shoes should be closer to boots than to pasta")
	}
}

func TestEmbedTruncate(t *testing.T) {
	c, ctx := connect(t)
	long := strings.Repeat("word ", 400) // past the model's max input tokens
	if _, err := c.Embed(ctx, []string{long}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("without Truncate: got %v, want InvalidArgument", err)
	}
	v, err := c.Embed(ctx, []string{long}, halflife.Truncate())
	if err != nil || len(v) != 1 || len(v[0]) != 384 {
		t.Fatalf("with Truncate: got %d vectors, %v", len(v), err)
	}
	raw, err := c.Embedding.Embed(ctx, &pb.EmbedRequest{Inputs: []string{long}, Truncate: true})
	if err != nil || len(raw.Embeddings) != 1 || !raw.Embeddings[0].Truncated {
		t.Fatalf("raw truncated embed: %v %v", raw, err)
	}
	if math.Abs(dot(v[0], raw.Embeddings[0].Values)-1) > 1e-4 {
		t.Errorf("Embed's vector is not the truncated text's")
	}
}

func TestEmbedSkipNormalize(t *testing.T) {
	c, ctx := connect(t)
	texts := []string{"trail running shoes"}
	unit, err := c.Embed(ctx, texts)
	if err != nil {
		t.Fatal(err)
	}
	pooled, err := c.Embed(ctx, texts, halflife.SkipNormalize())
	if err != nil {
		t.Fatal(err)
	}
	norm := math.Sqrt(dot(pooled[0], pooled[0]))
	if math.Abs(norm-1) < 1e-3 {
		t.Fatalf("SkipNormalize gave a unit vector (norm %v)", norm)
	}
	if math.Abs(dot(unit[0], pooled[0])/norm-1) > 1e-4 {
		t.Errorf("the pooled vector is not the unit one scaled")
	}
}

// Conn serves other services on the same connection: grpc's health checks.
func TestConnAnswersHealthChecks(t *testing.T) {
	c, ctx := connect(t)
	resp, err := healthpb.NewHealthClient(c.Conn()).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", resp, err)
	}
}

func TestCatalogEventsAndRecommendations(t *testing.T) {
	c, ctx := connect(t)
	t0 := time.Date(2026, 1, 5, 12, 0, 0, 0, time.UTC)
	items := []*pb.Item{
		{Id: "go-boots", Text: "Waterproof leather hiking boots for mountain trails", Categories: []string{"outdoor"}},
		{Id: "go-tent", Text: "Two-person ultralight backpacking tent", Categories: []string{"outdoor", "camping"}},
		{Id: "go-stove", Text: "Compact camping stove for backpacking trips", Categories: []string{"outdoor", "camping"}},
		{Id: "go-novel", Text: "A detective novel set in 1920s London", Categories: []string{"books"},
			CreateTime: halflife.Time(time.Date(1931, 6, 1, 0, 0, 0, 0, time.UTC))},
	}
	up, err := c.Catalog.UpsertItems(ctx, &pb.UpsertItemsRequest{Items: items})
	if err != nil {
		t.Fatal(err)
	}
	if up.CreatedCount != 4 || up.UpdatedCount != 0 {
		t.Fatalf("upsert: %v", up)
	}
	t.Cleanup(func() { // the server as found: the test runs again against it (go test -count=2)
		ids := []string{"go-boots", "go-tent", "go-stove", "go-novel"}
		if _, err := c.Catalog.DeleteItems(ctx, &pb.DeleteItemsRequest{Ids: ids}); err != nil {
			t.Error(err)
		}
	})
	got, err := c.Catalog.GetItems(ctx, &pb.GetItemsRequest{Ids: []string{"go-novel"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Items) != 1 || got.Items[0].CreateTime.AsTime().Year() != 1931 || got.Items[0].Text != items[3].Text {
		t.Fatalf("get: %v", got.Items)
	}

	var listed []string // the whole catalogue, a page of 2 at a time, in order of id
	for token := ""; ; {
		page, err := c.Catalog.ListItems(ctx, &pb.ListItemsRequest{PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, item := range page.Items {
			if strings.HasPrefix(item.Id, "go-") {
				listed = append(listed, item.Id)
			}
		}
		if token = page.NextPageToken; token == "" {
			break
		}
	}
	if strings.Join(listed, " ") != "go-boots go-novel go-stove go-tent" {
		t.Fatalf("list items: %v", listed)
	}
	for _, req := range []*pb.ListItemsRequest{nil, {PageSize: 3}} { // pages of MaxPageSize, and of 3
		var each []string
		err := c.EachItem(ctx, req, func(item *pb.Item) error {
			if strings.HasPrefix(item.Id, "go-") {
				each = append(each, item.Id)
			}
			return nil
		})
		if err != nil || strings.Join(each, " ") != strings.Join(listed, " ") {
			t.Fatalf("EachItem(%v): %v %v", req, each, err)
		}
	}

	rating := 4.5
	events := []*pb.Event{
		{EventId: "go-e1", UserId: "go-ana", Type: pb.EventType_EVENT_TYPE_VIEW, ItemId: "go-boots", EventTime: halflife.Time(t0)},
		{EventId: "go-e2", UserId: "go-ana", Type: pb.EventType_EVENT_TYPE_PURCHASE, ItemId: "go-tent", EventTime: halflife.Time(t0.Add(5 * time.Minute))},
		{EventId: "go-e3", UserId: "go-ana", Type: pb.EventType_EVENT_TYPE_RATE, ItemId: "go-boots", Value: &rating, EventTime: halflife.Time(t0.Add(6 * time.Minute))},
	}
	rec, err := c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: events})
	if err != nil {
		t.Fatal(err)
	}
	if rec.AcceptedCount != 3 || rec.DuplicateCount != 0 {
		t.Fatalf("record: %v", rec)
	}
	again, err := c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: events[:1]})
	if err != nil || again.DuplicateCount != 1 {
		t.Fatalf("re-sent event: %v %v", again, err)
	}

	recs, err := c.Recommend.Recommend(ctx, &pb.RecommendRequest{
		UserId: "go-ana", Limit: 2, AsOfTime: halflife.Time(t0.Add(10 * time.Minute)), Explain: true,
		Filter: &pb.ItemFilter{IncludeCategories: []string{"outdoor", "books"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if recs.Strategy != pb.Strategy_STRATEGY_PERSONALIZED || len(recs.Items) == 0 || recs.Items[0].ItemId != "go-stove" {
		t.Fatalf("recommend: %v", recs)
	}
	if recs.Items[0].Explanation == nil {
		t.Errorf("no explanation")
	}
	similar, err := c.Recommend.SimilarItems(ctx, &pb.SimilarItemsRequest{Target: &pb.SimilarItemsRequest_ItemId{ItemId: "go-tent"}, Limit: 1})
	if err != nil || len(similar.Items) != 1 || similar.Items[0].ItemId != "go-stove" {
		t.Fatalf("similar: %v %v", similar, err)
	}
	profile, err := c.Interest.GetProfile(ctx, &pb.GetProfileRequest{UserId: "go-ana"})
	if err != nil || len(profile.Interests) == 0 {
		t.Fatalf("profile: %v %v", profile, err)
	}
	first, err := c.Interest.ListEvents(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageSize: 2})
	if err != nil || len(first.Events) != 2 || first.Events[0].EventId != "go-e1" || first.NextPageToken == "" {
		t.Fatalf("list events: %v %v", first, err)
	}
	rest, err := c.Interest.ListEvents(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageToken: first.NextPageToken})
	if err != nil || len(rest.Events) != 1 || rest.NextPageToken != "" || rest.Events[0].Value == nil ||
		*rest.Events[0].Value != rating || !rest.Events[0].EventTime.AsTime().Equal(t0.Add(6*time.Minute)) {
		t.Fatalf("list events, second page: %v %v", rest, err)
	}
	latest, err := c.Interest.ListEvents(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageSize: 1, NewestFirst: true})
	if err != nil || len(latest.Events) != 1 || latest.Events[0].EventId != "go-e3" || !latest.NewestFirst {
		t.Fatalf("list events, newest first: %v %v", latest, err)
	}
	var newest []string // two pages of 2, the last recorded first
	err = c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageSize: 2, NewestFirst: true}, func(e *pb.Event) error {
		newest = append(newest, e.EventId)
		return nil
	})
	if err != nil || strings.Join(newest, " ") != "go-e3 go-e2 go-e1" {
		t.Fatalf("EachEvent, newest first: %v %v", newest, err)
	}
	var ranged []string // [t0 + 1 min, t0 + 6 min): go-e2 alone
	err = c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageSize: 1, StartTime: halflife.Time(t0.Add(time.Minute)),
		EndTime: halflife.Time(t0.Add(6 * time.Minute))}, func(e *pb.Event) error {
		ranged = append(ranged, e.EventId)
		return nil
	})
	if err != nil || strings.Join(ranged, " ") != "go-e2" {
		t.Fatalf("EachEvent, a time range: %v %v", ranged, err)
	}
	stop, seen := errors.New("enough"), 0
	err = c.EachEvent(ctx, &pb.ListEventsRequest{UserId: "go-ana", PageSize: 2}, func(*pb.Event) error {
		seen++
		return stop
	})
	if err != stop || seen != 1 {
		t.Fatalf("EachEvent stopped by fn: %v after %d events, want fn's error after 1", err, seen)
	}
	deleted, err := c.Interest.DeleteUser(ctx, &pb.DeleteUserRequest{UserId: "go-ana"})
	if err != nil || deleted.DeletedEventCount != 3 {
		t.Fatalf("delete user: %v %v", deleted, err)
	}
}

func TestErrorsCarryFieldViolations(t *testing.T) {
	c, ctx := connect(t)
	_, err := c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: []*pb.Event{
		{EventId: "go-bad", UserId: "go-ana", Type: pb.EventType_EVENT_TYPE_UNSPECIFIED, ItemId: "x"},
	}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT, got %v", err)
	}
	violations := halflife.FieldViolations(err)
	if len(violations) != 1 || violations[0].Field != "events[0].type" {
		t.Fatalf("violations: %+v", violations)
	}
	_, err = c.Recommend.SimilarItems(ctx, &pb.SimilarItemsRequest{Target: &pb.SimilarItemsRequest_ItemId{ItemId: "go-ghost"}, Limit: 1})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("want NOT_FOUND, got %v", err)
	}
	if v := halflife.FieldViolations(err); len(v) != 1 || v[0].Field != "item_id" {
		t.Fatalf("violations: %+v", v)
	}
	if halflife.FieldViolations(nil) != nil {
		t.Fatal("nil error has violations")
	}
}

// A page of items past gRPC-Go's default 4 MiB receive limit, within the
// server's 64 MiB: 200 items of 32 KiB text (the documented maximum) each.
func TestLargeResponses(t *testing.T) {
	c, ctx := connect(t)
	vector := make([]float32, 384)
	for i := range vector {
		vector[i] = 1
	}
	text := strings.Repeat("a", 32*1024)
	var items []*pb.Item
	var ids []string
	for i := 0; i < 200; i++ {
		ids = append(ids, fmt.Sprintf("go-large-%d", i))
		items = append(items, &pb.Item{Id: ids[i], Text: text, Vector: vector})
	}
	if _, err := c.Catalog.UpsertItems(ctx, &pb.UpsertItemsRequest{Items: items}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Catalog.DeleteItems(context.Background(), &pb.DeleteItemsRequest{Ids: ids}) })
	got, err := c.Catalog.GetItems(ctx, &pb.GetItemsRequest{Ids: ids})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Items) != 200 || got.Items[199].Text != text {
		t.Fatalf("got %d items", len(got.Items))
	}
}

// A Go string may hold any bytes; protobuf-go refuses to marshal one that is
// not UTF-8, which gRPC reported INTERNAL ("string field contains invalid
// UTF-8"), naming no field. Refused unsent, each such field named.
func TestAStringThatIsNotUTF8IsRefusedNamingItsField(t *testing.T) {
	c, tries := dialCounting(t, address)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, test := range []struct {
		name    string
		call    func() error
		message string
		want    []halflife.FieldViolation
	}{
		{"an event's user", func() error {
			_, err := c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: []*pb.Event{
				{EventId: "go-utf8-1", UserId: "go-utf8-user", Type: pb.EventType_EVENT_TYPE_VIEW, ItemId: "x"},
				{EventId: "go-utf8-2", UserId: "go-utf8-user\xff", Type: pb.EventType_EVENT_TYPE_VIEW, ItemId: "x"},
			}})
			return err
		}, "halflife: events[1].user_id: must be valid UTF-8 text, not a string with the byte 0xff at 12",
			[]halflife.FieldViolation{{"events[1].user_id", "must be valid UTF-8 text, not a string with the byte 0xff at 12"}}},
		{"a text to embed", func() error {
			_, err := c.Embed(ctx, []string{"fine", "caf\xc3"})
			return err
		}, "halflife: inputs[1]: must be valid UTF-8 text, not a string with the byte 0xc3 at 3",
			[]halflife.FieldViolation{{"inputs[1]", "must be valid UTF-8 text, not a string with the byte 0xc3 at 3"}}},
		{"an item's category and attributes", func() error {
			_, err := c.Catalog.UpsertItems(ctx, &pb.UpsertItemsRequest{Items: []*pb.Item{{
				Id: "go-utf8", Text: "fine", Categories: []string{"a", "\x80b"},
				Attributes: map[string]string{"k\xfe": "v", "colour": "r\xe9d"},
			}}})
			return err
		}, "halflife: items[0].categories[1]: must be valid UTF-8 text, not a string with the byte 0x80 at 0 (and 2 more)",
			[]halflife.FieldViolation{
				{"items[0].categories[1]", "must be valid UTF-8 text, not a string with the byte 0x80 at 0"},
				{`items[0].attributes["colour"]`, "must be valid UTF-8 text, not a string with the byte 0xe9 at 1"},
				{"items[0].attributes", "keys must be valid UTF-8 text, not a string with the byte 0xfe at 1"},
			}},
		{"a filter's item id", func() error {
			_, err := c.Recommend.Recommend(ctx, &pb.RecommendRequest{UserId: "go-ana", Limit: 1,
				Filter: &pb.ItemFilter{ExcludeItemIds: []string{"\xed\xa0\x80"}}}) // a surrogate, encoded
			return err
		}, "halflife: filter.exclude_item_ids[0]: must be valid UTF-8 text, not a string with the byte 0xed at 0",
			[]halflife.FieldViolation{{"filter.exclude_item_ids[0]", "must be valid UTF-8 text, not a string with the byte 0xed at 0"}}},
	} {
		*tries = 0
		err := test.call()
		got := halflife.FieldViolations(err)
		// One try, whose marshaling failed: not sent, and not tried again.
		if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != test.message ||
			fmt.Sprint(got) != fmt.Sprint(test.want) || *tries != 1 {
			t.Errorf("%s: got %v, %+v after %d tries; want InvalidArgument %q, %+v, after 1",
				test.name, err, got, *tries, test.message, test.want)
		}
	}
	if v, err := c.Embed(ctx, []string{"U+FFFD itself is text: \uFFFD"}); err != nil || len(v) != 1 {
		t.Errorf("a valid U+FFFD: %v", err)
	}
	if page, err := c.Interest.ListEvents(ctx, &pb.ListEventsRequest{UserId: "go-utf8-user"}); err != nil || len(page.Events) != 0 {
		t.Errorf("events of a refused batch were stored: %v %v", page, err)
	}
}

// A nil request is the empty one, as EachItem and EachEvent take it: gRPC
// failed it INTERNAL ("proto: Marshal called with nil"), which says a bug.
func TestANilRequestIsTheEmptyOne(t *testing.T) {
	c, ctx := connect(t)
	info, err := c.Embedding.GetModelInfo(ctx, nil)
	if err != nil || info.Dimension != 384 {
		t.Fatalf("GetModelInfo(nil): %v %v", info, err)
	}
	_, err = c.Recommend.Recommend(ctx, nil)
	if v := halflife.FieldViolations(err); status.Code(err) != codes.InvalidArgument || len(v) == 0 || v[0].Field != "user_id" {
		t.Fatalf("Recommend(nil): got %v, %+v; want the server's InvalidArgument for an empty user_id", err, v)
	}
}
