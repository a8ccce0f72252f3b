// The PostgreSQL JDBC driver against sluice, for the end-to-end tests: a query, a server-side
// prepared statement (prepareThreshold=1), a transaction, and COPY in both directions through
// the driver's CopyManager. Prints one line per check, "name=value".
//
// usage: java -cp .:/usr/share/java/postgresql.jar JdbcClient JDBC_URL
import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcClient {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0])) {
            try (Statement s = c.createStatement()) {
                ResultSet r = s.executeQuery(
                    "select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())");
                r.next();
                System.out.println("user=" + r.getString(1));
                System.out.println("ssl=" + r.getBoolean(2));
                s.execute("create table if not exists jdbc_t (id int primary key, name text)");
                s.execute("truncate jdbc_t");
            }
            try (PreparedStatement p = c.prepareStatement("insert into jdbc_t values (?, ?)")) {
                for (int i = 0; i < 3; i++) {
                    p.setInt(1, i);
                    p.setString(2, "row" + i);
                    p.executeUpdate();
                }
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.execute("insert into jdbc_t values (10, 'rolled back')");
            }
            c.rollback();
            try (Statement s = c.createStatement()) {
                s.execute("insert into jdbc_t values (11, 'committed')");
            }
            c.commit();
            c.setAutoCommit(true);
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            long in = copy.copyIn("copy jdbc_t (id, name) from stdin",
                new StringReader("100\tcopied100\n101\tcopied101\n"));
            System.out.println("copied_in=" + in);
            StringWriter w = new StringWriter();
            copy.copyOut("copy (select id from jdbc_t order by id) to stdout", w);
            System.out.println("ids=" + w.toString().trim().replace('\n', ','));
        }
    }
}
