package halflife_test

import (
	"context"
	"fmt"
	"log"
	"time"

	halflife "github.com/halflife/halflife/clients/go"
	pb "github.com/halflife/halflife/clients/go/halflifev1"
)

// A tour: catalogue, events, a recommendation and a rejected request. Run by
// `go test` against the live test server (`address` is "127.0.0.1:PORT").
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := halflife.Dial(ctx, address)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	info, err := c.Embedding.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("model:", info.ModelId, info.Dimension)

	_, err = c.Catalog.UpsertItems(ctx, &pb.UpsertItemsRequest{Items: []*pb.Item{
		{Id: "ex-tent", Text: "Two-person ultralight backpacking tent", Categories: []string{"gear"}},
		{Id: "ex-stove", Text: "Compact camping stove", Categories: []string{"gear"}},
		{Id: "ex-novel", Text: "A detective novel set in 1920s London", Categories: []string{"books"}},
	}})
	if err != nil {
		log.Fatal(err)
	}
	now := time.Now()
	_, err = c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: []*pb.Event{
		{EventId: "ex-1", UserId: "ex-user", Type: pb.EventType_EVENT_TYPE_VIEW, ItemId: "ex-tent", EventTime: halflife.Time(now.Add(-time.Hour))},
		{EventId: "ex-2", UserId: "ex-user", Type: pb.EventType_EVENT_TYPE_PURCHASE, ItemId: "ex-tent", EventTime: halflife.Time(now.Add(-time.Minute))},
	}})
	if err != nil {
		log.Fatal(err)
	}
	// Only this example's items: other code may share the catalogue.
	recs, err := c.Recommend.Recommend(ctx, &pb.RecommendRequest{
		UserId: "ex-user", Limit: 1, Filter: &pb.ItemFilter{IncludeCategories: []string{"gear"}},
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, item := range recs.Items { // none: the output below fails the example
		fmt.Println("recommended:", item.ItemId, recs.Strategy)
	}

	_, err = c.Interest.RecordEvents(ctx, &pb.RecordEventsRequest{Events: []*pb.Event{
		{EventId: "ex-3", UserId: "ex-user", Type: pb.EventType_EVENT_TYPE_CLICK},
	}})
	for _, v := range halflife.FieldViolations(err) {
		fmt.Printf("rejected: %s: %s\n", v.Field, v.Description)
	}
	// Output:
	// model: sentence-transformers/all-MiniLM-L6-v2 384
	// recommended: ex-stove STRATEGY_PERSONALIZED
	// rejected: events[0].item_id: an event needs an item_id, a text, or both
}
